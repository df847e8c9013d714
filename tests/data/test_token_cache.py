"""Token cache: eos separators, deterministic disjoint held-out split, re-use without re-tokenising."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from qwerky.data import DataError, TokenCache, build_token_cache


class CountingTokenizer:
    """Wraps a tokenizer and counts calls, to prove a cache hit does not tokenise."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


DOCS = [f"Document number {i}: the quick brown fox {i * 7} jumps over the lazy dog." for i in range(60)]


def _corpus(tmp_path: Path, docs=DOCS, name="corpus.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return p


def _split_docs(tokens: np.ndarray, eos: int) -> list[tuple[int, ...]]:
    assert tokens[-1] == eos
    cuts = np.flatnonzero(np.asarray(tokens) == eos)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tuple(int(t) for t in tokens[s:c]) for s, c in zip(starts, cuts)]


def test_tokens_and_eos_separators(tmp_path, tokenizer):
    cache = build_token_cache(_corpus(tmp_path), tokenizer, tmp_path / "cache", heldout_fraction=0.1)
    assert isinstance(cache, TokenCache)
    assert cache.train.dtype == np.uint32 and isinstance(cache.train, np.memmap)
    eos = tokenizer.eos_token_id
    expected = {tuple(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in DOCS}
    train, held = _split_docs(cache.train, eos), _split_docs(cache.heldout, eos)
    assert set(train) | set(held) == expected
    assert not set(train) & set(held)  # disjoint
    assert len(train) + len(held) == len(DOCS)
    splits = cache.meta["splits"]
    assert splits["train"] == {"tokens": len(cache.train), "docs": len(train)}
    assert splits["heldout"] == {"tokens": len(cache.heldout), "docs": len(held)}
    assert 1 <= len(held) < 20
    assert cache.meta["tokenizer"]["vocab_size"] == len(tokenizer)
    assert cache.meta["heldout_fraction"] == 0.1 and cache.meta["seed"] == 0
    assert cache.meta["sources"][0]["size"] == (tmp_path / "corpus.jsonl").stat().st_size


def test_reuse_without_retokenising(tmp_path, tokenizer):
    src = _corpus(tmp_path)
    tok = CountingTokenizer(tokenizer)
    first = build_token_cache(src, tok, tmp_path / "cache")
    assert tok.calls > 0
    calls = tok.calls
    mtime = os.stat(first.path / "train.bin").st_mtime_ns
    second = build_token_cache(src, tok, tmp_path / "cache")
    assert tok.calls == calls
    assert second.path == first.path and os.stat(second.path / "train.bin").st_mtime_ns == mtime
    np.testing.assert_array_equal(first.train, second.train)
    # a changed source (size/mtime) or split setting builds a new entry
    third = build_token_cache(src, tok, tmp_path / "cache", seed=1)
    assert tok.calls > calls and third.path != first.path
    src.write_text(src.read_text() + json.dumps({"text": "one more"}) + "\n")
    calls = tok.calls
    fourth = build_token_cache(src, tok, tmp_path / "cache")
    assert tok.calls > calls and fourth.path != first.path
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]


def test_split_deterministic_by_content_not_position(tmp_path, tokenizer):
    a = build_token_cache(_corpus(tmp_path, DOCS, "a.jsonl"), tokenizer, tmp_path / "c1",
                          heldout_fraction=0.2)
    rev = build_token_cache(_corpus(tmp_path, DOCS[::-1], "b.jsonl"), tokenizer, tmp_path / "c2",
                            heldout_fraction=0.2)
    eos = tokenizer.eos_token_id
    assert set(_split_docs(a.heldout, eos)) == set(_split_docs(rev.heldout, eos))
    other_seed = build_token_cache(tmp_path / "a.jsonl", tokenizer, tmp_path / "c3", heldout_fraction=0.2,
                                   seed=5)
    assert set(_split_docs(other_seed.heldout, eos)) != set(_split_docs(a.heldout, eos))


def test_at_least_one_heldout_document(tmp_path, tokenizer):
    cache = build_token_cache(_corpus(tmp_path, DOCS[:2]), tokenizer, tmp_path / "cache",
                              heldout_fraction=1e-9)
    assert cache.meta["splits"]["heldout"]["docs"] == 1
    assert cache.meta["splits"]["train"]["docs"] == 1
    single = build_token_cache(_corpus(tmp_path, DOCS[:1], "one.jsonl"), tokenizer, tmp_path / "cache")
    assert single.meta["splits"]["heldout"]["docs"] == 0 and len(single.heldout) == 0


def test_explicit_heldout_paths(tmp_path, tokenizer):
    train_src = _corpus(tmp_path, DOCS[:10], "train.jsonl")
    held_src = tmp_path / "held.txt"
    held_src.write_text("a held-out text")
    cache = build_token_cache(train_src, tokenizer, tmp_path / "cache", heldout_paths=[held_src])
    assert cache.meta["splits"]["train"]["docs"] == 10
    assert _split_docs(cache.heldout, tokenizer.eos_token_id) == [
        tuple(tokenizer("a held-out text", add_special_tokens=False)["input_ids"])
    ]
    assert cache.meta["heldout_fraction"] is None


def test_tokenizer_without_eos(tmp_path, tokenizer):
    tok = CountingTokenizer(tokenizer)
    tok.eos_token_id = None
    with pytest.raises(DataError, match="no eos token"):
        build_token_cache(_corpus(tmp_path), tok, tmp_path / "cache")


def test_bad_source_leaves_no_cache(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        build_token_cache(bad, tokenizer, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary build folder was removed


def test_corrupt_entry_is_rebuilt(tmp_path, tokenizer):
    src = _corpus(tmp_path)
    first = build_token_cache(src, tokenizer, tmp_path / "cache")
    expected = np.array(first.train)
    del first
    with open(tmp_path / "cache" / _only_entry(tmp_path) / "train.bin", "r+b") as fh:
        fh.truncate(8)
    again = build_token_cache(src, tokenizer, tmp_path / "cache")
    np.testing.assert_array_equal(again.train, expected)


def _only_entry(tmp_path: Path) -> str:
    (entry,) = [p.name for p in (tmp_path / "cache").iterdir()]
    return entry


def test_real_python_docs_validation(tmp_path, tokenizer):
    path = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "python-docs-validation.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"shared data not available at {path} (only on development/CI machines)")
    cache = build_token_cache(path, tokenizer, tmp_path / "cache")
    assert cache.meta["splits"]["train"]["docs"] + cache.meta["splits"]["heldout"]["docs"] == 24
    assert cache.meta["splits"]["heldout"]["docs"] >= 1
    assert int(cache.train.max()) < len(tokenizer)


def test_cache_feeds_packed_batches(tmp_path, tokenizer):
    from qwerky.data import PackedBatches, heldout_windows

    cache = build_token_cache(_corpus(tmp_path), tokenizer, tmp_path / "cache", heldout_fraction=0.2)
    batch = next(PackedBatches(cache.train, seq_len=16, batch_size=4, seed=0))
    assert batch.shape == (4, 16) and int(batch.max()) < len(tokenizer)
    assert heldout_windows(cache.heldout, seq_len=16, max_windows=2).shape[1] == 16
