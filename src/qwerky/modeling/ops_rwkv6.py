"""RWKV-6 (gated linear attention with per-channel data-dependent decay) in three forms.

Per head, state S of shape [K, V] in fp32 (fla's convention):

    o_t = scale * r_t^T (S_{t-1} + diag(u) k_t v_t^T)
    S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T

`w` is the log-decay (<= 0). RAD-RWKV6 has no learned bonus: it calls these with u = 1, so the current
token enters at full weight, as in gated linear attention.

* `naive_recurrent_rwkv6`: per-token loop, the reference.
* `chunk_rwkv6_torch`: chunked parallel form in PyTorch.
* `recurrent_step_rwkv6`: decode from a fixed-size state.
* `rwkv6_attention`: dispatch to fla's `chunk_rwkv6`/`fused_recurrent_rwkv6` on CUDA when installed.

This file is copied into every exported model folder: it must import nothing from qwerky.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .ops_varlen import chunk_layout, from_chunk_stream, segment_scan, to_chunk_stream

__all__ = ["naive_recurrent_rwkv6", "chunk_rwkv6_torch", "recurrent_step_rwkv6", "rwkv6_attention", "fla_available"]


def _check(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
           initial_state: torch.Tensor | None) -> None:
    if r.dim() != 4:
        raise ValueError(f"rwkv6: expected r of shape [B, T, H, K], got {tuple(r.shape)}")
    for name, x in (("k", k), ("w", w)):
        if x.shape != r.shape:
            raise ValueError(f"rwkv6: {name} has shape {tuple(x.shape)}, expected {tuple(r.shape)} like r")
    if v.shape[:3] != r.shape[:3]:
        raise ValueError(f"rwkv6: v has shape {tuple(v.shape)}, expected [B, T, H, V] matching r")
    if tuple(u.shape) != tuple(r.shape[2:]):
        raise ValueError(f"rwkv6: u has shape {tuple(u.shape)}, expected [H, K] = {tuple(r.shape[2:])}")
    if initial_state is not None:
        B, _, H, K = r.shape
        if tuple(initial_state.shape) != (B, H, K, v.shape[-1]):
            raise ValueError(f"rwkv6: initial_state has shape {tuple(initial_state.shape)}, "
                             f"expected {(B, H, K, v.shape[-1])}")


def naive_recurrent_rwkv6(
    r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
    scale: float = 1.0, initial_state: torch.Tensor | None = None, output_final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference per-token recurrence; returns (o [B, T, H, V], final state [B, H, K, V])."""
    _check(r, k, v, w, u, initial_state)
    B, T, H, K = r.shape
    V = v.shape[-1]
    dtype = v.dtype
    r, k, v, w, u = (x.float() for x in (r, k, v, w, u))
    S = r.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    out = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # (B, H, K, V)
        out.append((r[:, t, :, None, :] @ (S + u[None, :, :, None] * kv)).squeeze(-2) * scale)
        S = S * w[:, t].exp()[..., None] + kv
    o = torch.stack(out, dim=1).to(dtype)
    return o, (S if output_final_state else None)


def recurrent_step_rwkv6(
    r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
    state: torch.Tensor, scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode: the recurrence from `state` (fp32, [B, H, K, V]); memory independent of context."""
    return naive_recurrent_rwkv6(r, k, v, w, u, scale=scale, initial_state=state, output_final_state=True)


def chunk_rwkv6_torch(
    r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
    scale: float = 1.0, initial_state: torch.Tensor | None = None, output_final_state: bool = True,
    chunk_size: int = 16, cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked parallel form. Decay factors are taken relative to the chunk's middle so that
    exp(+-chunk_size * max|w| / 2) stays far from fp32 limits (RAD-RWKV6 clamps w >= -5).

    cu_seqlens ([S + 1] token offsets, B == 1): S sequences packed along T in one pass (`ops_varlen`);
    initial_state and the final state are then [S, H, K, V]."""
    _check(r, k, v, w, u, None if cu_seqlens is not None else initial_state)
    B, T, H, K = r.shape
    V = v.shape[-1]
    dtype = v.dtype
    C = chunk_size
    pad = (-T) % C
    layout = None if cu_seqlens is None else chunk_layout(cu_seqlens, C, T)
    xs = [x.float() for x in (r, k, v, w)]
    if layout is not None:  # each sequence from a chunk boundary, zero steps between (rows copied whole)
        xs = [to_chunk_stream(x, layout, dim=1) for x in xs]
    xs = [x.transpose(1, 2) for x in xs]  # (B, H, T, D)
    if layout is not None:
        pad = layout.num_chunks * C - T
    elif pad:
        xs = [F.pad(x, (0, 0, 0, pad)) for x in xs]
    N = (T + pad) // C
    r_, k_, v_, w_ = (x.reshape(B, H, N, C, x.shape[-1]) for x in xs)
    uf = u.float()[None, :, None, None, :]  # (1, H, 1, 1, K)
    diag = (r_ * uf * k_).sum(-1, keepdim=True)  # bonus term on the current token
    M = B * H * N  # every chunk of every head is one matrix of a batched matmul
    r_, k_, v_, w_, diag = (x.reshape(M, C, x.shape[-1]) for x in (r_, k_, v_, w_, diag))

    c = w_.cumsum(dim=-2)  # inclusive
    c_prev = c - w_
    c_last = c[:, -1:]
    ref = c[:, C // 2: C // 2 + 1]
    rq = r_ * (c_prev - ref).exp()  # r_t gamma_{t-1} (relative to ref)
    kq = k_ * (ref - c).exp()  # k_j / gamma_j (relative to ref)
    A = torch.bmm(rq, kq.transpose(-1, -2)).tril_(-1)  # (M, C, C); masked in place on a fresh output
    intra = torch.baddbmm(diag * v_, A, v_)
    r_state = r_ * c_prev.exp()  # r_t gamma_{t-1}, bounded by 1
    k_end = k_ * (c_last - c).exp()
    En = torch.bmm(k_end.transpose(-1, -2), v_)  # (M, K, V)
    decay_end = c_last.exp().transpose(-1, -2)  # (M, K, 1)

    if layout is not None:
        s0 = r_.new_zeros(layout.num_seqs, H, K, V) if initial_state is None else initial_state
        starts_v, finals = segment_scan(lambda d_, E_, S_: torch.addcmul(E_, d_, S_), decay_end.view(H, N, K, 1),
                                        En.view(H, N, K, V), s0, layout)
        o = torch.baddbmm(intra, r_state, starts_v.reshape(M, K, V), beta=scale, alpha=scale)
        o = from_chunk_stream(o.view(1, H, N * C, V), layout, dim=2).transpose(1, 2).to(dtype)
        return o, (finals if output_final_state else None)
    S = r_.new_zeros(B * H, K, V) if initial_state is None else initial_state.float().reshape(B * H, K, V)
    starts = []
    # unbind: backward stacks N gradients once (indexing En[:, n] would zero-fill a full En per chunk)
    for d_n, En_n in zip(decay_end.view(B * H, N, K, 1).unbind(1), En.view(B * H, N, K, V).unbind(1)):
        starts.append(S)
        S = torch.addcmul(En_n, d_n, S)
    S0 = torch.stack(starts, dim=1).view(M, K, V)
    o = torch.baddbmm(intra, r_state, S0, beta=scale, alpha=scale)  # scale * (r_state S_0 + intra)
    o = o.view(B, H, N * C, V)[:, :, :T].transpose(1, 2).to(dtype)
    return o, (S.view(B, H, K, V) if output_final_state else None)


_FLA: dict[str, object] | None = None


def _fla() -> dict[str, object]:
    global _FLA
    if _FLA is None:
        try:
            from fla.ops.rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6  # type: ignore

            _FLA = {"chunk": chunk_rwkv6, "recurrent": fused_recurrent_rwkv6}
        except Exception:  # noqa: BLE001
            _FLA = {}
    return _FLA


def fla_available() -> bool:
    """True when flash-linear-attention's RWKV-6 kernels import (needs triton and a GPU driver)."""
    return bool(_fla())


def rwkv6_attention(
    r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
    scale: float = 1.0, initial_state: torch.Tensor | None = None, output_final_state: bool = True,
    backend: str = "auto", cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla kernels on CUDA when installed; else chunked PyTorch (T > 1) or the step form (T == 1).
    cu_seqlens: sequences packed along T (B == 1; states [S, H, K, V]), always the chunked form."""
    T = r.shape[1]
    if backend == "auto":  # QWERKY_KERNELS=torch forces the PyTorch forms
        backend = os.environ.get("QWERKY_KERNELS", "auto")
    fla = _fla()
    if backend == "fla" or (backend == "auto" and r.is_cuda and fla):
        if not fla:
            raise RuntimeError("rwkv6: backend='fla' needs flash-linear-attention and triton "
                               "(pip install 'qwerky[gpu]') and a CUDA device")
        fn = fla["recurrent" if (T == 1 and not torch.is_grad_enabled() and cu_seqlens is None) else "chunk"]
        state = None if initial_state is None else initial_state.float()
        k, v, w, u = (x.to(r.dtype) for x in (k, v, w, u))  # one dtype for the kernels (autocast mixes them)
        extra = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens.long()}
        return fn(r, k, v, w, u, scale=scale, initial_state=state,  # type: ignore[operator]
                  output_final_state=output_final_state, **extra)
    with torch.autocast(r.device.type, enabled=False):  # the PyTorch forms compute in fp32 under autocast too
        if cu_seqlens is not None:
            return chunk_rwkv6_torch(r, k, v, w, u, scale, initial_state, output_final_state, cu_seqlens=cu_seqlens)
        if backend == "naive" or T == 1:
            return naive_recurrent_rwkv6(r, k, v, w, u, scale, initial_state, output_final_state)
        return chunk_rwkv6_torch(r, k, v, w, u, scale, initial_state, output_final_state)
