"""Packed batches: coverage, seeded determinism, exact resume, world-size independence."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from qwerky.data import DataError, PackedBatches, heldout_windows

SEQ = 8


def _stream(n_windows: int = 13, extra: int = 3) -> np.ndarray:
    return np.arange(n_windows * SEQ + extra, dtype=np.uint32)


def _take(loader: PackedBatches, n: int) -> list[torch.Tensor]:
    return list(itertools.islice(loader, n))


def test_shapes_and_windows():
    loader = PackedBatches(_stream(), seq_len=SEQ, batch_size=4, seed=0)
    batch = next(loader)
    assert batch.dtype == torch.long and batch.shape == (4, SEQ)
    assert loader.tokens_per_batch == 4 * SEQ and loader.num_windows == 13
    # every row is one aligned, contiguous window of the stream
    assert torch.all(batch[:, 0] % SEQ == 0)
    assert torch.equal(batch - batch[:, :1], torch.arange(SEQ).expand(4, SEQ))


def test_each_epoch_is_a_permutation_of_all_windows():
    loader = PackedBatches(_stream(13), seq_len=SEQ, batch_size=13, seed=3)
    e0, e1 = next(loader), next(loader)
    for e in (e0, e1):
        assert sorted((e[:, 0] // SEQ).tolist()) == list(range(13))
    assert not torch.equal(e0, e1)  # reshuffled per epoch
    assert loader.state_dict()["epoch"] == 2


def test_batch_spans_epoch_boundary_without_skipping():
    loader = PackedBatches(_stream(5), seq_len=SEQ, batch_size=3, seed=0)
    rows = torch.cat(_take(loader, 10))  # 30 rows = 6 epochs of 5 windows
    firsts = (rows[:, 0] // SEQ).view(6, 5)
    for epoch in firsts:
        assert sorted(epoch.tolist()) == list(range(5))


def test_deterministic_for_seed():
    a = _take(PackedBatches(_stream(), SEQ, 4, seed=7), 9)
    b = _take(PackedBatches(_stream(), SEQ, 4, seed=7), 9)
    c = _take(PackedBatches(_stream(), SEQ, 4, seed=8), 9)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_resume_yields_same_next_batches():
    ref = PackedBatches(_stream(), SEQ, 4, seed=1)
    _take(ref, 5)
    state = ref.state_dict()
    expected = _take(ref, 12)  # crosses several epochs
    resumed = PackedBatches(_stream(), SEQ, 4, seed=1)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(expected, _take(resumed, 12)))


def test_resume_rejects_different_settings():
    state = PackedBatches(_stream(), SEQ, 4, seed=1).state_dict()
    with pytest.raises(DataError, match="seed"):
        PackedBatches(_stream(), SEQ, 4, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="num_windows"):
        PackedBatches(_stream(20), SEQ, 4, seed=1).load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_together_equal_single_process(world_size):
    single = _take(PackedBatches(_stream(), SEQ, 4, seed=2), 7)
    ranks = [_take(PackedBatches(_stream(), SEQ, 4, seed=2, rank=r, world_size=world_size), 7)
             for r in range(world_size)]
    for step, expected in enumerate(single):
        parts = [ranks[r][step] for r in range(world_size)]
        assert all(p.shape == (4 // world_size, SEQ) for p in parts)
        assert torch.equal(torch.cat(parts), expected)  # contiguous row slices in rank order


def test_resume_on_another_world_size():
    ref = PackedBatches(_stream(), SEQ, 4, seed=4)
    _take(ref, 3)
    state = ref.state_dict()
    expected = next(ref)
    r1 = PackedBatches(_stream(), SEQ, 4, seed=4, rank=1, world_size=2)
    r1.load_state_dict(state)
    assert torch.equal(next(r1), expected[2:])


def test_memmap_input(tmp_path):
    path = tmp_path / "t.bin"
    _stream().tofile(path)
    mm = np.memmap(path, dtype=np.uint32, mode="r")
    assert torch.equal(next(PackedBatches(mm, SEQ, 4)), next(PackedBatches(_stream(), SEQ, 4)))


def test_errors():
    with pytest.raises(DataError, match="fewer than one window"):
        PackedBatches(np.arange(5, dtype=np.uint32), seq_len=SEQ, batch_size=1)
    with pytest.raises(DataError, match="divisible"):
        PackedBatches(_stream(), SEQ, batch_size=3, world_size=2)
    with pytest.raises(DataError, match="rank"):
        PackedBatches(_stream(), SEQ, batch_size=4, rank=2, world_size=2)


def test_heldout_windows():
    tokens = _stream(10)
    all_w = heldout_windows(tokens, SEQ)
    assert all_w.shape == (10, SEQ) and all_w.dtype == torch.long
    assert torch.equal(all_w.flatten(), torch.arange(10 * SEQ))
    some = heldout_windows(tokens, SEQ, max_windows=4)
    assert some.shape == (4, SEQ)
    assert torch.equal(some, heldout_windows(tokens, SEQ, max_windows=4))
    assert (some[:, 0] // SEQ).tolist() == [0, 3, 6, 9]  # spread over the stream, ends included
    assert heldout_windows(tokens, SEQ, max_windows=100).shape == (10, SEQ)
    with pytest.raises(DataError, match="fewer than one window"):
        heldout_windows(np.zeros(3, dtype=np.uint32), SEQ)
