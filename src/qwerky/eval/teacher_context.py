"""The teacher's effective context: how far into a window its own loss keeps improving, on the user's text.

Configs often declare more positions than the model was trained on (a teacher trained at 256 tokens
whose config says 2,048). Past its real context a teacher's loss by position stops falling and rises, and
distilling there (stage 4's KL at 1,024 tokens) teaches the student the teacher's confusion. This
measures loss by position on held-out windows (documents packed as in training) and finds where it
degrades: the first position bucket whose mean loss exceeds the best earlier bucket's by more than a
relative tolerance and by more than twice its standard error over the windows (loss by position is noisy
on a small held-out set). Everything before that bucket is the effective context.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .models import head_logits, hidden_states
from .quality import position_buckets

TOLERANCE = 0.02  # a bucket 2% worse than the best before it counts as degraded


def effective_from_buckets(buckets: Sequence[Sequence[int]], losses: Sequence[float | None],
                           tolerance: float = TOLERANCE, stderr: Sequence[float] | None = None) -> dict[str, Any]:
    """From mean loss per [lo, hi) position bucket: the effective context and whether loss degrades. With
    `stderr` (per bucket, over windows) a rise must also exceed twice the bucket's standard error."""
    best = float("inf")
    measured = 0
    for j, ((lo, hi), loss) in enumerate(zip(buckets, losses)):
        if loss is None:
            break
        margin = max(best * tolerance, 2 * stderr[j] if stderr is not None else 0.0)
        if loss > best + margin:
            return {"effective": int(lo), "degrades": True, "measured_to": int(buckets[-1][1]),
                    "worst_over_best": loss / best}
        best = min(best, loss)
        measured = int(hi)
    return {"effective": measured, "degrades": False, "measured_to": measured, "worst_over_best": 1.0}


@torch.no_grad()
def teacher_effective_context(teacher: nn.Module, windows: torch.Tensor, tolerance: float = TOLERANCE,
                              batch_size: int = 4) -> dict[str, Any]:
    """Loss by position of `teacher` over `windows` [N, L] and the effective context it implies."""
    n, length = windows.shape
    device = next(teacher.parameters()).device
    per_window = torch.zeros(n, length, dtype=torch.float64)
    for b0 in range(0, n, batch_size):
        x = windows[b0:b0 + batch_size].to(device)
        hidden, head, _ = hidden_states(teacher, x)
        for s in range(0, length - 1, 256):
            e = min(length - 1, s + 256)
            logp = head_logits(teacher, head, hidden[:, s:e]).log_softmax(-1)
            nll = -logp.gather(-1, x[:, s + 1:e + 1, None])[..., 0]
            per_window[b0:b0 + x.shape[0], s + 1:e + 1] = nll.double().cpu()
    buckets = position_buckets(length)
    means = torch.stack([per_window[:, lo:hi].mean(1) for lo, hi in buckets], 1)  # [N, buckets]
    losses = means.mean(0).tolist()
    stderr = (means.std(0) / n**0.5).tolist() if n > 1 else None
    result = effective_from_buckets(buckets, losses, tolerance, stderr)
    result["stderr"] = stderr
    result.update(buckets=[list(b) for b in buckets], loss=losses, windows=int(n), tolerance=tolerance)
    return result


def describe(result: dict[str, Any]) -> str:
    if result["degrades"]:
        return (f"the teacher's loss by position degrades from position {result['effective']} on "
                f"({result['worst_over_best']:.2f}x its best there): its effective context is about "
                f"{result['effective']} tokens")
    return f"the teacher's loss by position does not degrade up to {result['measured_to']} tokens"
