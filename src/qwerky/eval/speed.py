"""Decode speed and memory per sequence, measured the same way for students and HF teachers.

Students carry a QwerkyState (fixed size for recurrent layers); teachers an HF KV cache that grows with
the context. Both are timed by the same loop, so a ratio measured in one run compares like with like.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from qwerky.eval.models import is_recurrent


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cache_bytes(cache: Any) -> int:
    """Bytes held by a QwerkyState or by the tensors of an HF cache."""
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    seen: set[int] = set()
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def decode_run(model: Any, batch: int, prefill: int, steps: int, seed: int = 0) -> dict[str, float]:
    """Prefill `prefill` random tokens for `batch` sequences, then decode `steps` tokens one at a time.

    Returns tokens/s of the decode steps and the cache/state bytes per sequence at the end."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch, prefill), generator=gen).to(device)
    tok = torch.randint(0, vocab, (batch, 1), generator=gen).to(device)
    if is_recurrent(model):
        cache = model.init_state(batch)
        model(prompt, past_key_values=cache, use_cache=True)

        def step() -> None:
            model(tok, past_key_values=cache, use_cache=True)
    else:
        cache = model(prompt, use_cache=True).past_key_values  # an HF cache, grown in place by each step

        def step() -> None:
            model(tok, past_key_values=cache, use_cache=True)
    step()  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    elapsed = time.perf_counter() - t0
    return {"tokens_per_s": batch * steps / elapsed, "bytes_per_sequence": cache_bytes(cache) / batch}


def decode_rate(model: Any, batch: int, prefill: int, steps: int) -> float:
    """Tokens/s of `steps` single-token decode calls after a `prefill`-token prompt."""
    return decode_run(model, batch, prefill, steps)["tokens_per_s"]
