"""Recall rows: the passage really appears twice with a gap past the window, the share is as asked, and
batches with recall rows stay seeded, resumable and independent of the number of ranks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from qwerky.data import DataError, PackedBatches, RecallRows

T = 256


def _stream(n_windows: int = 40) -> np.ndarray:
    return np.arange(n_windows * T, dtype=np.uint32)  # every token distinct: copies are easy to find


def test_recall_row_layout() -> None:
    recall = RecallRows(1.0, min_gap=96, seq_len=T, seed=3)
    rows = _stream(8).astype(np.int64).reshape(8, T)
    out = recall.apply(rows, np.arange(8))
    for i in range(8):
        start, length, gap = recall.layout(i)
        assert length >= T // 16 and gap >= 96 and start + 2 * length + gap <= T
        passage = rows[i, start:start + length]
        second = start + length + gap
        assert np.array_equal(out[i, :second], rows[i, :second])  # original text up to the copy
        assert np.array_equal(out[i, second:second + length], passage)  # the passage again, past the gap
        assert np.array_equal(out[i, second + length:], rows[i, second:T - length])  # then the text goes on
    assert not np.array_equal(out, rows) and np.array_equal(rows, _stream(8).reshape(8, T))  # input untouched


def test_share_of_recall_rows() -> None:
    recall = RecallRows(0.3, min_gap=64, seq_len=T)
    chosen = sum(recall.layout(c) is not None for c in range(2000))
    assert 0.25 < chosen / 2000 < 0.35
    assert all(RecallRows(0.0, 64, T).layout(c) is None for c in range(50))


def test_bad_settings_name_the_fix() -> None:
    with pytest.raises(DataError, match="fraction must be in"):
        RecallRows(1.5, 64, T)
    with pytest.raises(DataError, match="seq_len 128 is too short"):
        RecallRows(0.5, 128, 128)


def _take(loader: PackedBatches, n: int) -> list[torch.Tensor]:
    return list(itertools.islice(loader, n))


def test_batches_with_recall_resume_and_shard_exactly() -> None:
    def loader(**kw) -> PackedBatches:
        return PackedBatches(_stream(), T, 4, seed=5, recall=RecallRows(0.5, 64, T, seed=5), **kw)

    single = _take(loader(), 25)  # crosses two epochs
    plain = _take(PackedBatches(_stream(), T, 4, seed=5), 25)
    changed = sum(int(not torch.equal(a, b)) for a, b in zip(single, plain))
    assert changed > 10  # recall rows are really in the batches
    ranks = [_take(loader(rank=r, world_size=2), 25) for r in range(2)]
    assert all(torch.equal(torch.cat([a, b]), s) for a, b, s in zip(*ranks, single))
    ref = loader()
    _take(ref, 7)
    state = ref.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(_take(ref, 10), _take(resumed, 10)))
