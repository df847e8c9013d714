"""Gated DeltaNet (the gated delta rule, Yang et al. 2024) in three forms.

Per head, with state S of shape [K, V] kept in fp32 (fla's convention):

    S_t = exp(g_t) S_{t-1}                                (g: one log-decay per head and token, <= 0)
    S_t = S_t + beta_t k_t (v_t - S_t^T k_t)^T            (beta in (0, 1): the delta rule's write strength)
    o_t = scale * S_t^T q_t                               (the current token is included)

q and k are expected L2-normalised per head by the caller: these ops do not normalise them.

* `naive_recurrent_gated_delta_rule`: per-token loop; the reference the tests trust.
* `chunk_gated_delta_rule_torch`: chunked parallel form (WY / UT transform, training and prefill) in plain
  PyTorch; runs anywhere.
* `recurrent_step_gated_delta_rule`: decode from a fixed-size state.
* `gated_delta_rule`: dispatch; uses flash-linear-attention's Triton kernels on CUDA when installed,
  the PyTorch forms otherwise.

q, k are laid out [B, T, H, K], v [B, T, H, V], g and beta [B, T, H]; states are [B, H, K, V]. The positional
tensor order (q, k, v, g, beta) is that of fla's `chunk_gated_delta_rule`.

This file is copied into every exported model folder: it must import nothing from qwerky.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .ops_varlen import chunk_layout, matrix_chunks_output, to_chunk_stream

__all__ = [
    "naive_recurrent_gated_delta_rule",
    "chunk_gated_delta_rule_torch",
    "recurrent_step_gated_delta_rule",
    "gated_delta_rule",
    "fla_available",
]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
           initial_state: torch.Tensor | None) -> None:
    if q.dim() != 4:
        raise ValueError(f"gated_deltanet: expected q of shape [B, T, H, K], got {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"gated_deltanet: k has shape {tuple(k.shape)}, expected {tuple(q.shape)} like q")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"gated_deltanet: v has shape {tuple(v.shape)}, expected [B, T, H, V] matching q "
                         f"(one value head per key head)")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != q.shape[:3]:
            raise ValueError(f"gated_deltanet: {name} has shape {tuple(x.shape)}, expected [B, T, H] = "
                             f"{tuple(q.shape[:3])} (one scalar per head and token)")
    if initial_state is not None:
        B, _, H, K = q.shape
        if tuple(initial_state.shape) != (B, H, K, v.shape[-1]):
            raise ValueError(f"gated_deltanet: initial_state has shape {tuple(initial_state.shape)}, "
                             f"expected {(B, H, K, v.shape[-1])}")


def naive_recurrent_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    scale: float = 1.0, initial_state: torch.Tensor | None = None, output_final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference per-token recurrence, in fp32; returns (o [B, T, H, V] in v's dtype, final state or None)."""
    _check(q, k, v, g, beta, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = v.dtype
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    out = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        kS = (k[:, t, :, None, :] @ S).squeeze(-2)  # S^T k, (B, H, V)
        u = beta[:, t, :, None] * (v[:, t] - kS)  # what the delta rule writes, (B, H, V)
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        out.append((q[:, t, :, None, :] @ S).squeeze(-2) * scale)  # (B, H, V)
    o = torch.stack(out, dim=1).to(dtype)
    return o, (S if output_final_state else None)


def recurrent_step_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor, scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode: runs the recurrence token by token from `state` (fp32, [B, H, K, V]); cost O(T), memory O(1)."""
    o, S = naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=state,
                                            output_final_state=True)
    assert S is not None
    return o, S


def chunk_gated_delta_rule_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    scale: float = 1.0, initial_state: torch.Tensor | None = None, output_final_state: bool = True,
    chunk_size: int = 64, cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked parallel form (WY / UT transform, one unit-triangular solve per chunk), exact up to fp32 rounding.

    Within a chunk starting from state S_0, with c_t the in-chunk cumulative log-decay, gamma_t = exp(c_t) and
    u_t = beta_t (v_t - (exp(g_t) S_{t-1})^T k_t) the vector actually written (S_t = exp(g_t) S_{t-1} + k_t u_t^T):
        u_t + beta_t sum_{i<t} exp(c_t - c_i) (k_t . k_i) u_i = beta_t v_t - beta_t gamma_t S_0^T k_t
    is a unit-lower-triangular system in u (U = U_1 - W S_0); outputs and the chunk-end state follow by
    matmuls, and the only sequential part is S_{n+1} = T_n S_n + E_n across chunks.

    Decays are stable for any finite g <= 0, whatever chunk_size: every exponent is a sum of g over a stretch
    inside one chunk (exp(c_t - c_i) for i <= t is built as a masked cumulative sum of g, never as a difference
    of two large cumulative sums nor as exp(-c)), so it is <= 0 and nothing overflows; decays below fp32's
    range underflow to 0, as they do in the naive loop. Tested exact in fp32 for g in [-5, 0] with chunk 64.
    g > 0 (growth) is not supported.

    cu_seqlens ([S + 1] token offsets, B == 1): S sequences packed along T in one pass (`ops_varlen`);
    initial_state and the final state are then [S, H, K, V].
    """
    _check(q, k, v, g, beta, None if cu_seqlens is not None else initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = v.dtype
    C = chunk_size
    pad = (-T) % C
    layout = None if cu_seqlens is None else chunk_layout(cu_seqlens, C, T)
    xs, gb = [x.float() for x in (q, k, v)], [x.float() for x in (g, beta)]
    if layout is not None:  # each sequence from a chunk boundary, zero steps (g = beta = k = 0) between
        xs = [to_chunk_stream(x, layout, dim=1) for x in xs]
        gb = [to_chunk_stream(x, layout, dim=1) for x in gb]
    xs = [x.transpose(1, 2) for x in xs]  # (B, H, T, D)
    gb = [x.transpose(1, 2) for x in gb]  # (B, H, T)
    if layout is not None:
        pad = layout.num_chunks * C - T
    elif pad:  # padded steps: g = 0 (no decay), beta = 0 and k = 0 (no write) -> state and outputs unaffected
        xs = [F.pad(x, (0, 0, 0, pad)) for x in xs]
        gb = [F.pad(x, (0, pad)) for x in gb]
    N = (T + pad) // C
    M = B * H * N  # every chunk of every head is one matrix of a batched matmul
    q_, k_, v_ = (x.reshape(M, C, x.shape[-1]) for x in xs)
    g_, b_ = (x.reshape(M, C) for x in gb)

    ones = torch.ones(C, C, dtype=torch.bool, device=q.device)
    # seg[t, i] = sum_{i < s <= t} g_s (= c_t - c_i), summed directly so that no large cumsums cancel
    seg = g_[:, :, None].expand(M, C, C).masked_fill(~ones.tril(-1), 0.0).cumsum(dim=-2)
    D = seg.masked_fill(~ones.tril(), float("-inf")).exp()  # exp(c_t - c_i) for i <= t, else 0 (no inf*0)
    c = g_.cumsum(dim=-1)  # inclusive log-decay from the chunk start, (M, C)
    gamma = c.exp()[..., None]  # (M, C, 1), <= 1
    gamma_last = c[:, -1:].exp()  # (M, 1)
    k_endT = (k_ * seg[:, -1, :, None].exp()).transpose(-1, -2)  # (k_i exp(c_C - c_i))^T, (M, K, C)
    kT = k_.transpose(-1, -2)

    # solve_triangular(unitriangular=True) reads only the strict lower part of L = I + A; D is already zero
    # above the diagonal, and its diagonal is never read
    bcol = b_[:, :, None]
    L = torch.bmm(k_, kT) * D * bcol  # A[t, i] = beta_t exp(c_t - c_i) k_t . k_i
    rhs = torch.cat([bcol * v_, bcol * gamma * k_], dim=-1)  # solve both right-hand sides at once
    sol = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)
    U1, W = sol.split([V, K], dim=-1)  # U = U1 - W S_0 (split, not slicing: no zero-filled grads)
    P = torch.bmm(q_, kT) * D  # P[t, i] = exp(c_t - c_i) q_t . k_i for i <= t (current token included)
    Q = torch.baddbmm(q_ * gamma, P, W, alpha=-1.0)  # o = scale * (Q S_0 + R)
    R = torch.bmm(P, U1)
    # chunk transition: S_end = T_n S_0 + E_n, T_n = gamma_C I - k_end^T W
    Tn = torch.baddbmm(W.new_zeros(()), k_endT, W, beta=0.0, alpha=-1.0)
    Tn.diagonal(dim1=-2, dim2=-1).add_(gamma_last)
    En = torch.bmm(k_endT, U1)

    if layout is not None:
        return matrix_chunks_output(Q, R, Tn, En, initial_state, layout, H, scale, dtype, output_final_state)
    S = q_.new_zeros(B * H, K, V) if initial_state is None else initial_state.float().reshape(B * H, K, V)
    starts = []
    # unbind: backward stacks N gradients once (indexing Tn[:, n] would zero-fill a full Tn per chunk)
    for Tn_n, En_n in zip(Tn.view(B * H, N, K, K).unbind(1), En.view(B * H, N, K, V).unbind(1)):
        starts.append(S)
        S = torch.baddbmm(En_n, Tn_n, S)
    S0 = torch.stack(starts, dim=1).view(M, K, V)
    o = torch.baddbmm(R, Q, S0, beta=scale, alpha=scale)  # scale * (Q S_0 + R), (M, C, V)
    o = o.view(B, H, N * C, V)[:, :, :T].transpose(1, 2).to(dtype)
    return o, (S.view(B, H, K, V) if output_final_state else None)


_FLA: dict[str, Callable[..., Any]] | None = None


def fla_available() -> bool:
    """True when flash-linear-attention's gated-delta-rule kernels import (needs triton and a GPU driver)."""
    global _FLA
    if _FLA is None:
        try:
            from fla.ops.gated_delta_rule import (  # type: ignore[import-not-found]
                chunk_gated_delta_rule,
                fused_recurrent_gated_delta_rule,
            )

            def recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                          **kwargs: Any) -> Any:
                # fla's fused recurrent form is (q, k, v, g, gk, gv, beta, ...): beta must go by name
                return fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, **kwargs)

            _FLA = {"chunk": chunk_gated_delta_rule, "recurrent": recurrent}
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            _FLA = {}
    return bool(_FLA)


def gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    scale: float = 1.0, initial_state: torch.Tensor | None = None, output_final_state: bool = True,
    backend: str = "auto", cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick the fastest correct form: fla Triton kernels on CUDA, else chunked (T > 1) or step (T == 1).

    backend: "auto", "fla", "torch" (chunked/step in PyTorch) or "naive". cu_seqlens: sequences packed
    along T (B == 1; states [S, H, K, V]), always the chunked form (fla's varlen kernel on CUDA).
    """
    T = q.shape[1]
    if backend == "auto":  # QWERKY_KERNELS=torch forces the PyTorch forms (e.g. while Triton cannot compile)
        backend = os.environ.get("QWERKY_KERNELS", "auto")
    use_fla = backend == "fla" or (backend == "auto" and q.is_cuda and fla_available())
    if use_fla:
        if not fla_available():
            raise RuntimeError("gated_deltanet: backend='fla' needs flash-linear-attention and triton "
                               "(pip install 'qwerky[gpu]') and a CUDA device")
        _check(q, k, v, g, beta, None if cu_seqlens is not None else initial_state)  # fla would accept HV > H
        recurrent = T == 1 and not torch.is_grad_enabled() and cu_seqlens is None
        fn = _FLA["recurrent" if recurrent else "chunk"]  # type: ignore[index]
        state = None if initial_state is None else initial_state.float()
        # under autocast q/k/v may arrive in different dtypes: the kernels want one; g and beta stay fp32 (as in
        # fla's own tests) so the log-decay keeps its precision through the kernels' cumulative sums
        k, v = (x.to(q.dtype) for x in (k, v))
        g, beta = g.float(), beta.float()
        # use_qk_l2norm_in_kernel, use_gate_in_kernel and use_beta_sigmoid_in_kernel default to False: q, k, g and
        # beta arrive final, as the PyTorch forms take them; state_v_first=False keeps the [K, V] state layout
        extra = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens.long()}
        return fn(q, k, v, g, beta, scale=scale, initial_state=state, output_final_state=output_final_state,
                  **extra)
    # the PyTorch forms run in fp32 whatever autocast says (triangular_solve has no bf16 kernel, and the
    # state recursion needs the precision); outputs come back in v's dtype
    with torch.autocast(q.device.type, enabled=False):
        if cu_seqlens is not None:
            return chunk_gated_delta_rule_torch(q, k, v, g, beta, scale, initial_state, output_final_state,
                                                cu_seqlens=cu_seqlens)
        if backend == "naive" or T == 1:
            return naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state)
        return chunk_gated_delta_rule_torch(q, k, v, g, beta, scale, initial_state, output_final_state)
