"""Stage 0's data-dependent start: each converted layer's output scaled, per head, to its teacher attention's.

Why: softmax attention returns a convex combination of values, whatever the size of q.k; a linear state
returns a *sum* weighted by r.k. Real pretrained teachers have large q.k (attention logits of 10-30 are
usual; they make softmax sharp), so the transferred mixer's output is 5-65x the attention output it replaces
(SmolLM2-135M: every one of 30 layers, relative error 5-66 fed the teacher's own input), and the residual
stream blows up by layer 1. A tiny teacher trained here has small q.k, which is why this never showed.

The fix keeps every mixer's architecture: on a few rows of the user's text, every layer fed the teacher's
own input (stage 1's set-up), it fits one non-negative scale per head by least squares, so that
sum_h s_h W_o[:, h] y_h best matches the teacher attention output, and folds s_h into the columns of the
student's own copy of o_proj. The fitted output is never further from the teacher's than a zero output on
those rows (relative error <= 1: a head that does not help is turned down, not left to wreck the stream).
Stage 1 then trains from there, o_proj included. Mixers that start exact (the window student) opt out
with `fits_output_scale = False`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .alignment import AlignmentTap
from .stages import TeacherTaps, recurrent_mixers, teacher_base

ROW_CHUNK = 512  # tokens per least-squares accumulation: bounds the [chunk, C, H] per-head product
SCALE_FLOOR = 1e-3  # a head's scale is at least this times its layer's largest: gradients still reach it


def nonnegative_least_squares(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """argmin_{s >= 0} s^T G s - 2 r^T s for a small symmetric positive semi-definite G (active-set method)."""
    n = gram.shape[0]
    ridge = 1e-8 * float(gram.diagonal().mean().clamp_min(1e-30)) * torch.eye(n, dtype=gram.dtype)
    free = torch.ones(n, dtype=torch.bool)
    s = torch.zeros(n, dtype=gram.dtype)
    for _ in range(n):
        s = torch.zeros(n, dtype=gram.dtype)
        idx = free.nonzero()[:, 0]
        if len(idx) == 0:
            break
        s[idx] = torch.linalg.solve((gram + ridge)[idx][:, idx], rhs[idx])
        if bool((s[idx] >= 0).all()):
            break
        free &= s > 0
    return s.clamp_min(0)


def _head_gram(y: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, heads: int
               ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Normal equations of target ~ sum_h W[:, h] y_h over the rows of y [N, H*D], target [N, C]."""
    d = y.shape[-1] // heads
    gram = torch.zeros(heads, heads, dtype=torch.float64)
    rhs = torch.zeros(heads, dtype=torch.float64)
    sq = 0.0
    w = weight.float().view(weight.shape[0], heads, d)
    for s in range(0, y.shape[0], ROW_CHUNK):
        yc, tc = y[s:s + ROW_CHUNK].float().view(-1, heads, d), target[s:s + ROW_CHUNK].float()
        f = torch.einsum("nhd,chd->nch", yc, w)  # each head's contribution to the output
        gram += torch.einsum("nch,nck->hk", f, f).double()
        rhs += torch.einsum("nch,nc->h", f, tc).double()
        sq += float(tc.double().pow(2).sum())
    return gram, rhs, sq


@torch.no_grad()
def fit_output_scales(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor) -> dict[int, dict[str, Any]]:
    """Fit and fold the per-head output scales of every opted-in mixer (see the module docstring).

    input_ids [B, T] on any device. The teacher is left unchanged: each scaled o_proj weight is a new tensor.
    Returns {layer: {"scales": [H], "rel_error_before": e0, "rel_error_after": e1}} on those rows."""
    mixers = recurrent_mixers(student)
    fitted = [m for m in mixers if getattr(m, "fits_output_scale", False)
              and isinstance(getattr(m, "output", None), nn.Linear)
              and m.output.in_features == m.num_heads * m.head_dim]
    if not fitted:
        return {}
    ids = input_ids.to(next(student.parameters()).device)
    taps = TeacherTaps(teacher)
    try:
        teacher_base(teacher)(input_ids=ids, use_cache=False)
    finally:
        taps.remove()
    targets = {i: rec[2] for i, rec in taps.records.items()}
    taps.records.clear()
    inputs: dict[int, torch.Tensor] = {}

    def grab(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            inputs[layer] = args[0].detach()
        return hook

    handles = [m.output.register_forward_pre_hook(grab(m.layer_idx)) for m in fitted]
    try:
        with AlignmentTap(mixers).feeding(targets):  # every layer fed the teacher's own input
            student.hidden_states(ids)
    finally:
        for h in handles:
            h.remove()
    report: dict[int, dict[str, Any]] = {}
    for m in fitted:
        i = m.layer_idx
        out: nn.Linear = m.output
        if i not in inputs:  # this mixer applies o_proj's weight without calling the module: nothing seen
            continue
        y = inputs.pop(i).flatten(0, -2)
        target = targets[i].flatten(0, -2).to(y.device)
        if out.bias is not None:
            target = target - out.bias.to(target.dtype)
        gram, rhs, sq = _head_gram(y, out.weight, target, m.num_heads)
        ones = torch.ones(m.num_heads, dtype=torch.float64)
        scales = nonnegative_least_squares(gram, rhs)
        scales = scales.clamp_min(SCALE_FLOOR * float(scales.max())) if float(scales.max()) > 0 else scales

        def rel_error(s: torch.Tensor, gram: torch.Tensor = gram, rhs: torch.Tensor = rhs, sq: float = sq) -> float:
            return max(0.0, float(s @ gram @ s - 2 * rhs @ s + sq)) ** 0.5 / max(sq, 1e-30) ** 0.5

        report[i] = {"scales": [round(float(v), 6) for v in scales], "rel_error_before": rel_error(ones),
                     "rel_error_after": rel_error(scales)}
        column_scale = scales.to(out.weight.dtype).to(out.weight.device).repeat_interleave(m.head_dim)
        out.weight = nn.Parameter(out.weight.detach() * column_scale, requires_grad=out.weight.requires_grad)
    return report
