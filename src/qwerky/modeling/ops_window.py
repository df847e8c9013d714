"""Exact softmax attention over a bounded window plus sink tokens, with a fixed-size key/value cache.

A query at position p sees keys at positions j <= p with j < num_sinks or p - j < window
(window=None: every earlier key, i.e. the teacher's full causal attention). The cache keeps the
`num_sinks` first and `window` latest keys/values of each row, so memory per sequence is bounded.
Positions are absolute per row; -1 marks padding or an empty slot (never attended).

Copied into every exported model folder: imports nothing from qwerky.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layers_common import repeat_heads

# stacking rows of different lengths left-pads a growing cache: position -1 marks the padded slots empty
CACHE_PAD_VALUES = {"kpos": -1, "spos": -1}


def _allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, num_sinks: int) -> torch.Tensor:
    """Boolean [B, Tq, Tk]: which key may each query see."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    ok = (kp >= 0) & (kp <= qp)
    if window is not None:
        ok = ok & ((kp < num_sinks) | (qp - kp < window))
    return ok


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, scale: float,
    window: int | None, num_sinks: int, cache: dict[str, torch.Tensor] | None = None, block: int = 256,
) -> torch.Tensor:
    """Softmax attention of q [B, T, H, D] over cached + new keys k, v [B, T, Hk, D].

    positions [B, T] are the absolute positions of the new tokens (-1 = padding; padding only precedes
    real tokens). When `cache` is given (see `empty_cache`), it supplies the earlier keys and is updated
    in place with the new ones. With a window, queries are processed `block` at a time against only the
    keys they can see (sinks + the last `window` tokens), so a long prefill costs O(T * (W + block)),
    not O(T^2).
    """
    B, T, H, D = q.shape
    cached_k, cached_v, cached_p = [], [], []
    if cache is not None:
        if "sk" in cache:  # sink slots; window slots exclude positions < num_sinks to avoid duplicates
            cached_k.append(cache["sk"])
            cached_v.append(cache["sv"])
            cached_p.append(cache["spos"])
            cached_p.append(cache["kpos"].masked_fill(cache["kpos"] < num_sinks, -1))
        else:
            cached_p.append(cache["kpos"])
        cached_k.append(cache["k"])
        cached_v.append(cache["v"])
    if window is None or T <= 2 * block:
        spans = [(0, T, 0)]
    else:
        is_sink = (positions >= 0) & (positions < num_sinks)
        n_sink = int((is_sink.long() * torch.arange(1, T + 1, device=q.device)).max().item())  # last sink index + 1
        spans = [(a, min(T, a + block), max(0, a - window + 1)) for a in range(0, T, block)]
        spans = [(a, b, lo if lo > n_sink else 0) for a, b, lo in spans]
    outs = []
    for a, b, lo in spans:
        idx = torch.arange(lo, b, device=q.device)
        if lo > 0:  # keep the sink tokens at the front of the stream visible to this block
            idx = torch.cat([torch.arange(0, n_sink, device=q.device), idx])
        keys = torch.cat([*cached_k, k[:, idx]], 1) if cached_k else k[:, idx]
        values = torch.cat([*cached_v, v[:, idx]], 1) if cached_v else v[:, idx]
        k_pos = torch.cat([*cached_p, positions[:, idx]], 1) if cached_p else positions[:, idx]
        n_cached = keys.shape[1] - idx.numel()
        q_pos = positions[:, a:b]
        allowed = _allowed(q_pos, k_pos, window, num_sinks)
        # a padding query sees only itself, so no row of the softmax is empty
        own = torch.zeros_like(allowed)
        own[:, :, n_cached:] = torch.arange(a, b, device=q.device)[:, None] == idx[None, :]
        allowed = allowed | (own & (q_pos < 0)[:, :, None])
        n_rep = H // keys.shape[2]
        kk = repeat_heads(keys.to(q.dtype), n_rep).transpose(1, 2)
        vv = repeat_heads(values.to(q.dtype), n_rep).transpose(1, 2)
        out = F.scaled_dot_product_attention(q[:, a:b].transpose(1, 2), kk, vv, attn_mask=allowed[:, None], scale=scale)
        outs.append(out.transpose(1, 2))
    if cache is not None:
        _update_cache(cache, k, v, positions, window, num_sinks)
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


def empty_cache(batch_size: int, num_kv_heads: int, head_dim: int, window: int | None, num_sinks: int,
                dtype: torch.dtype, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Pre-allocated cache: `window` slots and `num_sinks` sink slots (window=None: an empty, growing cache)."""
    slots = 0 if window is None else window
    cache = {
        "k": torch.zeros(batch_size, slots, num_kv_heads, head_dim, dtype=dtype, device=device),
        "v": torch.zeros(batch_size, slots, num_kv_heads, head_dim, dtype=dtype, device=device),
        "kpos": torch.full((batch_size, slots), -1, dtype=torch.long, device=device),
    }
    if window is not None and num_sinks > 0:
        cache["sk"] = torch.zeros(batch_size, num_sinks, num_kv_heads, head_dim, dtype=dtype, device=device)
        cache["sv"] = torch.zeros(batch_size, num_sinks, num_kv_heads, head_dim, dtype=dtype, device=device)
        cache["spos"] = torch.full((batch_size, num_sinks), -1, dtype=torch.long, device=device)
    return cache


def _update_cache(cache: dict[str, torch.Tensor], k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  window: int | None, num_sinks: int) -> None:
    """Write the new keys/values. Window slots form a ring (position p lives in slot p % window), and both
    updates are scatters with no data-dependent shapes: nothing here waits for the GPU, so a decode step
    queues its kernels without a host sync (and can be captured in a CUDA graph)."""
    k = k.to(cache["k"].dtype)
    v = v.to(cache["v"].dtype)
    if positions.shape[1] == 1 and window is not None:
        _write_one(cache, k, v, positions, window, num_sinks)
        return
    if "sk" in cache:  # sink slot s takes the token at position s, if this call holds it
        sink = torch.arange(num_sinks, device=positions.device)
        hit = (positions[:, :, None] == sink).to(k.dtype)  # [B, T, S]; positions are unique per row
        got = hit.amax(1).bool()  # [B, S]
        cache["sk"] = torch.where(got[..., None, None], torch.einsum("bts,bthd->bshd", hit, k), cache["sk"])
        cache["sv"] = torch.where(got[..., None, None], torch.einsum("bts,bthd->bshd", hit, v), cache["sv"])
        cache["spos"] = torch.where(got, sink, cache["spos"])
    if window is None:  # a growing cache (the hybrid layers' full attention)
        for name, new in (("k", k), ("v", v), ("kpos", positions)):
            cache[name] = torch.cat([cache[name], new], dim=1)
        return
    # keep the last `window` positions of each row; everything else goes to a dump slot that is cut off
    pos = torch.cat([cache["kpos"], positions], 1)  # [B, W + T]
    newest = pos.amax(1, keepdim=True)
    keep = (pos >= 0) & (pos > newest - window)
    slot = torch.where(keep, pos.remainder(window), window)
    for name, new, fill in (("k", k, 0), ("v", v, 0), ("kpos", positions, -1)):
        joined = torch.cat([cache[name], new], 1)
        index = slot.view(*slot.shape, *([1] * (joined.dim() - 2))).expand_as(joined)
        ring = joined.new_full((joined.shape[0], window + 1, *joined.shape[2:]), fill)
        cache[name] = ring.scatter_(1, index, joined)[:, :window].contiguous()


def _write_one(cache: dict[str, torch.Tensor], k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               window: int, num_sinks: int) -> None:
    """Decode: write the one new entry of each row into its ring slot (and its sink slot while position <
    num_sinks), in place; a padding token (position -1) leaves every slot as it was."""
    writes = [(("k", "v", "kpos"), positions.clamp_min(0).remainder(window), positions >= 0)]
    if "sk" in cache:
        writes.append((("sk", "sv", "spos"), positions.clamp(0, num_sinks - 1),
                       (positions >= 0) & (positions < num_sinks)))
    for names, slot, ok in writes:
        for name, new in zip(names, (k, v, positions)):
            buf = cache[name]
            index = slot.view(*slot.shape, *([1] * (buf.dim() - 2))).expand_as(new)
            real = ok.view(*ok.shape, *([1] * (buf.dim() - 2)))
            buf.scatter_(1, index, torch.where(real, new, buf.gather(1, index)))
