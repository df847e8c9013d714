"""Prefix state cache: shared prefixes skip prefill, outputs match a cold run, bytes stay under the bound."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import build_tokenizer, tiny_teacher

from qwerky.modeling.mixer_base import mixer_names
from qwerky.serve.engine import SamplingParams, StudentEngine
from qwerky.serve.prefix_cache import PrefixStateCache
from qwerky.surgery import convert_teacher

TOK = build_tokenizer()


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("mixer", mixer_names())
def test_shared_prefix_prefills_less_and_matches_cold_run(mixer: str) -> None:
    student = convert_teacher(tiny_teacher("qwen2"), mixer=mixer)
    prefix = _ids(200, 1)
    first, second = prefix + _ids(30, 2), prefix + _ids(25, 3)
    greedy = SamplingParams(max_tokens=10, temperature=0)
    with StudentEngine(student, TOK, max_concurrent=2, prefix_block_tokens=64, eos_token_ids=[]) as engine:
        a = engine.generate(first, greedy, timeout=120)
        b = engine.generate(second, greedy, timeout=120)
        stats = engine.stats()["prefix_cache"]
    assert a.cached_tokens == 0 and a.prefill_tokens == len(first)
    assert b.cached_tokens == 192 and b.prefill_tokens == len(second) - 192  # 3 full 64-token blocks reused
    assert stats["hits"] == 1 and stats["misses"] == 1 and stats["hit_tokens"] == 192
    with StudentEngine(student, TOK, max_concurrent=2, prefix_block_tokens=64, eos_token_ids=[]) as cold:
        b_cold = cold.generate(second, greedy, timeout=120)
    with StudentEngine(student, TOK, max_concurrent=2, prefix_cache_mb=0, eos_token_ids=[]) as nocache:
        b_plain = nocache.generate(second, greedy, timeout=120)
    assert b_cold.cached_tokens == 0
    assert b.output_ids == b_cold.output_ids == b_plain.output_ids
    ref = student.generate(torch.tensor([second]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                           eos_token_id=None)[0, len(second):].tolist()
    assert b.output_ids == ref


def test_identical_prompt_reuses_all_but_the_last_block() -> None:
    student = convert_teacher(tiny_teacher("qwen2"), mixer="rwkv7")
    prompt = _ids(128, 4)  # exactly two blocks: the last token must still run to give logits
    with StudentEngine(student, TOK, max_concurrent=1, prefix_block_tokens=64, eos_token_ids=[]) as engine:
        a = engine.generate(prompt, SamplingParams(max_tokens=5, temperature=0), timeout=60)
        b = engine.generate(prompt, SamplingParams(max_tokens=5, temperature=0), timeout=60)
    assert b.cached_tokens == 64 and b.prefill_tokens == 64
    assert a.output_ids == b.output_ids


def test_eviction_keeps_bytes_under_the_bound() -> None:
    student = convert_teacher(tiny_teacher("qwen2"), mixer="rwkv7")
    one_state = student.init_state(1).nbytes()
    bound_mb = 3.5 * one_state / 2**20  # room for three states
    with StudentEngine(student, TOK, max_concurrent=2, prefix_cache_mb=bound_mb, prefix_block_tokens=16,
                       eos_token_ids=[]) as engine:
        for seed in range(4):
            engine.generate(_ids(100, 10 + seed), SamplingParams(max_tokens=2, temperature=0), timeout=60)
            cache = engine.prefix_cache
            assert cache.nbytes <= cache.max_bytes
        stats = engine.stats()["prefix_cache"]
    assert stats["entries"] == 3 and stats["bytes"] == 3 * one_state
    assert stats["inserts"] == 4 * 6 and stats["evictions"] == 4 * 6 - 3


class _FakeState:
    def __init__(self, size: int, tag: str) -> None:
        self.size, self.tag = size, tag

    def nbytes(self) -> int:
        return self.size

    def clone(self) -> _FakeState:
        return _FakeState(self.size, self.tag)


def test_cache_lru_order_longest_match_and_oversize() -> None:
    cache = PrefixStateCache(max_bytes=300, block_tokens=2)
    keys = cache.block_keys([1, 2, 3, 4, 5, 6, 7])
    assert len(keys) == 3 and len(set(keys)) == 3
    assert cache.block_keys([1, 2, 3, 9])[0] == keys[0] and cache.block_keys([1, 2, 3, 9])[1] != keys[1]
    for i, key in enumerate(keys):
        assert cache.insert(key, _FakeState(100, f"s{i}"))
    covered, state = cache.lookup(keys)
    assert covered == 6 and state.tag == "s2"
    covered, state = cache.lookup(keys[:1])  # touch s0: s1 is now least recently used
    assert covered == 2
    cache.insert(b"other", _FakeState(100, "x"))
    assert cache.lookup(keys[:2])[0] == 2  # s1 evicted, falls back to s0
    assert cache.nbytes == 300 and cache.evictions == 1
    assert not cache.insert(b"huge", _FakeState(301, "h"))
    assert cache.lookup([b"nope"]) == (0, None)
    assert PrefixStateCache(0).lookup(keys) == (0, None)
