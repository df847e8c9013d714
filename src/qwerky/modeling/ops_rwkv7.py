"""RWKV-7 (generalised delta rule with diagonal-plus-low-rank transition) in three forms.

Per head, with state S of shape [K, V] kept in fp32 (fla's convention):

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
    o_t = scale * S_t^T r_t                      (the current token is included)

`w` is the log-decay (<= 0). RAD-RWKV7 uses a = -kappa, b = kappa * iclr.

* `naive_recurrent_rwkv7`: per-token loop; the reference the tests trust.
* `chunk_rwkv7_torch`: chunked parallel form (training, prefill) in plain PyTorch; runs anywhere.
* `recurrent_step_rwkv7`: one decode step on a fixed-size state.
* `rwkv7_attention`: dispatch; uses flash-linear-attention's Triton kernels on CUDA when installed,
  the PyTorch forms otherwise.

All tensors are laid out [B, T, H, D]; states are [B, H, K, V].

This file is copied into every exported model folder: it must import nothing from qwerky.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .ops_varlen import chunk_layout, matrix_chunks_output, to_chunk_stream

__all__ = [
    "naive_recurrent_rwkv7",
    "chunk_rwkv7_torch",
    "recurrent_step_rwkv7",
    "rwkv7_attention",
    "fla_available",
]


def _check(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
           b: torch.Tensor, initial_state: torch.Tensor | None) -> None:
    if r.dim() != 4:
        raise ValueError(f"rwkv7: expected r of shape [B, T, H, K], got {tuple(r.shape)}")
    for name, x in (("w", w), ("k", k), ("a", a), ("b", b)):
        if x.shape != r.shape:
            raise ValueError(f"rwkv7: {name} has shape {tuple(x.shape)}, expected {tuple(r.shape)} like r")
    if v.shape[:3] != r.shape[:3]:
        raise ValueError(f"rwkv7: v has shape {tuple(v.shape)}, expected [B, T, H, V] matching r")
    if initial_state is not None:
        B, _, H, K = r.shape
        if tuple(initial_state.shape) != (B, H, K, v.shape[-1]):
            raise ValueError(f"rwkv7: initial_state has shape {tuple(initial_state.shape)}, "
                             f"expected {(B, H, K, v.shape[-1])}")


def naive_recurrent_rwkv7(
    r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    scale: float = 1.0, initial_state: torch.Tensor | None = None, output_final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference per-token recurrence. Inputs [B, T, H, K] (v: [B, T, H, V]); returns (o, final state)."""
    _check(r, w, k, v, a, b, initial_state)
    B, T, H, K = r.shape
    V = v.shape[-1]
    dtype = v.dtype
    r, w, k, v, a, b = (x.float() for x in (r, w, k, v, a, b))
    S = r.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    out = []
    for t in range(T):
        sa = (a[:, t, :, None, :] @ S)  # (B, H, 1, V)
        S = S * w[:, t].exp()[..., None] + b[:, t, :, :, None] * sa + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append((r[:, t, :, None, :] @ S).squeeze(-2) * scale)  # (B, H, V)
    o = torch.stack(out, dim=1).to(dtype)
    return o, (S if output_final_state else None)


def recurrent_step_rwkv7(
    r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    state: torch.Tensor, scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode: runs the recurrence token by token from `state` (fp32, [B, H, K, V]); cost O(T), memory O(1)."""
    return naive_recurrent_rwkv7(r, w, k, v, a, b, scale=scale, initial_state=state, output_final_state=True)


def chunk_rwkv7_torch(
    r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    scale: float = 1.0, initial_state: torch.Tensor | None = None, output_final_state: bool = True,
    chunk_size: int = 64, cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked parallel form (WY-style, one unit-triangular solve per chunk), exact up to fp32 rounding.

    Within a chunk, with gamma_t = prod_{s<=t} exp(w_s) and u_j = a_j^T S_{j-1}:
        u_j  = (a_j gamma_{j-1})^T S_0 + sum_{i<j} (a_j gamma_{j-1} / gamma_i) . (b_i u_i + k_i v_i^T)
    is a unit-lower-triangular system in u; outputs and the chunk-end state follow by matmuls, and the
    only sequential part is S_{n+1} = T_n S_n + E_n across chunks. Requires chunk_size * max|w| < ~80
    (RWKV-7's log-decay lies in [-0.61, 0], so 64 is safe in fp32).

    cu_seqlens ([S + 1] token offsets, B == 1): S sequences packed along T in one pass (`ops_varlen`);
    initial_state and the final state are then [S, H, K, V].
    """
    _check(r, w, k, v, a, b, None if cu_seqlens is not None else initial_state)
    B, T, H, K = r.shape
    V = v.shape[-1]
    dtype = v.dtype
    C = chunk_size
    pad = (-T) % C
    layout = None if cu_seqlens is None else chunk_layout(cu_seqlens, C, T)
    xs = [x.float() for x in (r, w, k, v, a, b)]
    if layout is not None:  # each sequence from a chunk boundary, zero steps between (rows copied whole)
        xs = [to_chunk_stream(x, layout, dim=1) for x in xs]
    xs = [x.transpose(1, 2) for x in xs]  # (B, H, T, D)
    if layout is not None:
        pad = layout.num_chunks * C - T
    elif pad:  # padded steps: no decay, no input -> the state passes through unchanged
        xs = [F.pad(x, (0, 0, 0, pad)) for x in xs]
    N = (T + pad) // C
    M = B * H * N  # every chunk of every head is one matrix of a batched matmul
    r_, w_, k_, v_, a_, b_ = (x.reshape(M, C, x.shape[-1]) for x in xs)

    c = w_.cumsum(dim=-2)  # inclusive log-decay (M, C, K)
    g_inv = (-c).exp()  # 1 / gamma_i
    g_last = c[:, -1:].exp()  # gamma_C, (M, 1, K)
    ag = a_ * (c - w_).exp()  # a_j gamma_{j-1}
    rg = r_ * c.exp()  # r_t gamma_t
    b_inv = b_ * g_inv  # b_i / gamma_i
    k_inv = k_ * g_inv
    b_invT, k_invT = b_inv.transpose(-1, -2), k_inv.transpose(-1, -2)
    b_endT = (b_inv * g_last).transpose(-1, -2)  # (b_j gamma_C / gamma_j)^T, (M, K, C)
    k_endT = (k_inv * g_last).transpose(-1, -2)

    # solve_triangular(unitriangular=True) reads only the strict lower part of L = I - A_ab, so -A_ab
    # stands in for L (no eye, no mask). The other masks act in place on fresh matmul outputs.
    L = torch.baddbmm(ag.new_zeros(()), ag, b_invT, beta=0.0, alpha=-1.0)
    A_ak = torch.bmm(ag, k_invT).tril_(-1)
    P_b = torch.bmm(rg, b_invT).tril_()
    P_k = torch.bmm(rg, k_invT).tril_()
    rhs = torch.cat([ag, torch.bmm(A_ak, v_)], dim=-1)  # solve both right-hand sides at once
    sol = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)
    M1, M2 = sol.split([K, V], dim=-1)  # u = M1 S_0 + M2 (split, not slicing: no zero-filled grads)
    Q = torch.baddbmm(rg, P_b, M1)  # o = Q S_0 + R
    R = torch.baddbmm(torch.bmm(P_k, v_), P_b, M2)
    # chunk transition: S_end = T_n S_0 + E_n, T_n = diag(gamma_C) + b_end^T M1
    Tn = torch.bmm(b_endT, M1)
    Tn.diagonal(dim1=-2, dim2=-1).add_(g_last.squeeze(-2))
    En = torch.baddbmm(torch.bmm(k_endT, v_), b_endT, M2)

    if layout is not None:
        return matrix_chunks_output(Q, R, Tn, En, initial_state, layout, H, scale, dtype, output_final_state)
    S = r_.new_zeros(B * H, K, V) if initial_state is None else initial_state.float().reshape(B * H, K, V)
    starts = []
    # unbind: backward stacks N gradients once (indexing Tn[:, n] would zero-fill a full Tn per chunk)
    for Tn_n, En_n in zip(Tn.view(B * H, N, K, K).unbind(1), En.view(B * H, N, K, V).unbind(1)):
        starts.append(S)
        S = torch.baddbmm(En_n, Tn_n, S)
    S0 = torch.stack(starts, dim=1).view(M, K, V)
    o = torch.baddbmm(R, Q, S0, beta=scale, alpha=scale)  # scale * (Q S_0 + R), (M, C, V)
    o = o.view(B, H, N * C, V)[:, :, :T].transpose(1, 2).to(dtype)
    return o, (S.view(B, H, K, V) if output_final_state else None)


_FLA: dict[str, object] | None = None


def fla_available() -> bool:
    """True when flash-linear-attention's RWKV-7 kernels import (needs triton and a GPU driver)."""
    global _FLA
    if _FLA is None:
        try:
            from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7  # type: ignore

            _FLA = {"chunk": chunk_rwkv7, "recurrent": fused_recurrent_rwkv7}
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            _FLA = {}
    return bool(_FLA)


def rwkv7_attention(
    r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    scale: float = 1.0, initial_state: torch.Tensor | None = None, output_final_state: bool = True,
    backend: str = "auto", cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick the fastest correct form: fla Triton kernels on CUDA, else chunked (T > 1) or step (T == 1).

    backend: "auto", "fla", "torch" (chunked/step in PyTorch) or "naive". cu_seqlens: sequences packed
    along T (B == 1; states [S, H, K, V]), always the chunked form (fla's varlen kernel on CUDA).
    """
    T = r.shape[1]
    if backend == "auto":  # QWERKY_KERNELS=torch forces the PyTorch forms (e.g. while Triton cannot compile)
        backend = os.environ.get("QWERKY_KERNELS", "auto")
    use_fla = backend == "fla" or (backend == "auto" and r.is_cuda and fla_available())
    if use_fla:
        if not fla_available():
            raise RuntimeError("rwkv7: backend='fla' needs flash-linear-attention and triton "
                               "(pip install 'qwerky[gpu]') and a CUDA device")
        recurrent = T == 1 and not torch.is_grad_enabled() and cu_seqlens is None
        fn = _FLA["recurrent" if recurrent else "chunk"]  # type: ignore[index]
        state = None if initial_state is None else initial_state.float()
        # under autocast r/k/v arrive in bf16 while w/a/b may be fp32: the kernels want one dtype
        w, k, v, a, b = (x.to(r.dtype) for x in (w, k, v, a, b))
        extra = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens.long()}
        o, s = fn(r, w, k, v, a, b, scale=scale, initial_state=state,  # type: ignore[operator]
                  output_final_state=output_final_state, **extra)
        return o, s
    # the PyTorch forms run in fp32 whatever autocast says (triangular_solve has no bf16 kernel, and the
    # state recursion needs the precision); outputs come back in v's dtype
    with torch.autocast(r.device.type, enabled=False):
        if cu_seqlens is not None:
            return chunk_rwkv7_torch(r, w, k, v, a, b, scale, initial_state, output_final_state,
                                     cu_seqlens=cu_seqlens)
        if backend == "naive" or T == 1:
            return naive_recurrent_rwkv7(r, w, k, v, a, b, scale, initial_state, output_final_state)
        return chunk_rwkv7_torch(r, w, k, v, a, b, scale, initial_state, output_final_state)
