"""The teacher's effective context: how far into a window its own loss keeps improving, on the user's text.

Configs often declare more positions than the model was trained on (a teacher trained at 256 tokens
whose config says 2,048). Past its real context a teacher's loss by position stops falling and rises, and
distilling there (stage 4's KL at 1,024 tokens) teaches the student the teacher's confusion. This
measures loss by position on held-out windows (documents packed as in training) and finds where it
degrades: the first position bucket whose mean loss exceeds the best earlier bucket's by more than a
relative tolerance and by more than twice its standard error over the windows (loss by position is noisy
on a small held-out set). Everything before that bucket is the effective context.

Only buckets with enough text are trusted: at least `MIN_TOKENS` tokens from at least `MIN_COUNT` windows
(or documents). When the buckets past the last trusted one are thin and nothing degraded before them, the
answer is status "not_enough_data" ("not enough long text to tell"), not a number: a mean over a handful
of long documents once made a teacher trained at 256 tokens look like one of 128.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .models import head_logits, hidden_states, progress_bar
from .quality import position_buckets

TOLERANCE = 0.02  # a bucket 2% worse than the best before it counts as degraded
MIN_TOKENS = 1000  # a bucket needs this many tokens ...
MIN_COUNT = 16  # ... from this many windows / documents to be trusted

# status: "degrades" (effective = where it starts), "holds" (no rise out to measured_to, every bucket
# trusted), "not_enough_data" (no rise in the trusted buckets, thin ones after them: effective is None)
STATUSES = ("degrades", "holds", "not_enough_data")


def effective_from_buckets(buckets: Sequence[Sequence[int]], losses: Sequence[float | None],
                           tolerance: float = TOLERANCE, stderr: Sequence[float | None] | None = None,
                           tokens: Sequence[int] | None = None, counts: Sequence[int] | None = None,
                           min_tokens: int = MIN_TOKENS, min_count: int = MIN_COUNT) -> dict[str, Any]:
    """From mean loss per [lo, hi) position bucket: the effective context and whether loss degrades. With
    `stderr` (per bucket, over windows) a rise must also exceed twice the bucket's standard error. With
    `tokens` / `counts` (per bucket: tokens, windows or documents) a bucket below `min_tokens` /
    `min_count` is thin, as is one whose loss is None: the walk stops there, and unless a trusted bucket
    already degraded the result is "not_enough_data" (`effective` None, `trusted_to` the end of the
    trusted buckets, `measured_to` the end of the last bucket, `thin_from` / `thin_tokens` / `thin_count`
    where the thin ones begin and what they held).
    """
    best = float("inf")
    measured = 0
    trusted = 0
    thin_at = None
    for j, ((lo, hi), loss) in enumerate(zip(buckets, losses)):
        short = (tokens is not None and tokens[j] < min_tokens) or (counts is not None and counts[j] < min_count)
        if loss is None or short:
            thin_at = j
            break
        err = stderr[j] if stderr is not None and stderr[j] is not None else 0.0
        margin = max(best * tolerance, 2 * err)
        if loss > best + margin:
            return {"status": "degrades", "effective": int(lo), "degrades": True, "measured_to": int(buckets[-1][1]),
                    "worst_over_best": loss / best}
        best = min(best, loss)
        measured = int(hi)
        trusted += 1
    if thin_at is None and trusted >= 2:
        return {"status": "holds", "effective": measured, "degrades": False, "measured_to": measured,
                "worst_over_best": 1.0}
    result: dict[str, Any] = {"status": "not_enough_data", "effective": None, "degrades": False,
                              "measured_to": int(buckets[-1][1]) if len(buckets) else 0, "trusted_to": measured,
                              "worst_over_best": 1.0}
    if thin_at is not None:
        rest = range(thin_at, len(buckets))
        result["thin_from"] = int(buckets[thin_at][0])
        if tokens is not None:
            result["thin_tokens"] = int(sum(tokens[j] for j in rest))
        if counts is not None:
            result["thin_count"] = int(counts[thin_at])
    result.update(min_tokens=min_tokens, min_count=min_count)
    return result


def effective_from_position(position: Mapping[str, Any], name: str = "teacher",
                            tolerance: float = TOLERANCE) -> dict[str, Any] | None:
    """The effective context from `loss_by_position`'s result for model `name` (None if it is absent):
    its buckets up to its cut, their stderr over documents, tokens and documents per bucket."""
    row = position.get("models", {}).get(name)
    if not row:
        return None
    n = sum(1 for lo, _ in position["buckets"] if lo < row.get("cut", position["max_len"]))
    buckets = [tuple(b) for b in position["buckets"][:n]]
    losses = row.get("loss_all", row["loss"])[:n]
    tokens = row.get("tokens", [])[:n] or None
    docs = row.get("documents", [])[:n] or None
    stderr = row.get("stderr", [])[:n] or None
    return effective_from_buckets(buckets, losses, tolerance, stderr, tokens, docs,
                                  position.get("min_tokens", MIN_TOKENS), position.get("min_documents", MIN_COUNT))


@torch.no_grad()
def teacher_effective_context(teacher: nn.Module, windows: torch.Tensor, tolerance: float = TOLERANCE,
                              batch_size: int = 4, progress: bool = True) -> dict[str, Any]:
    """Loss by position of `teacher` over `windows` [N, L] and the effective context it implies (fewer than
    MIN_COUNT windows: "not_enough_data")."""
    n, length = windows.shape
    device = next(teacher.parameters()).device
    per_window = torch.zeros(n, length, dtype=torch.float64)
    with progress_bar(n, f"teacher context: {n} windows of {length}", "window", progress) as bar:
        for b0 in range(0, n, batch_size):
            x = windows[b0:b0 + batch_size].to(device)
            hidden, head, _ = hidden_states(teacher, x)
            for s in range(0, length - 1, 256):
                e = min(length - 1, s + 256)
                logp = head_logits(teacher, head, hidden[:, s:e]).log_softmax(-1)
                nll = -logp.gather(-1, x[:, s + 1:e + 1, None])[..., 0]
                per_window[b0:b0 + x.shape[0], s + 1:e + 1] = nll.double().cpu()
                del logp
            bar.update(x.shape[0])
    buckets = position_buckets(length)
    means = torch.stack([per_window[:, lo:hi].mean(1) for lo, hi in buckets], 1)  # [N, buckets]
    losses = means.mean(0).tolist()
    stderr = (means.std(0) / n**0.5).tolist() if n > 1 else None
    tokens = [n * (hi - lo) for lo, hi in buckets]
    result = effective_from_buckets(buckets, losses, tolerance, stderr, tokens, [n] * len(buckets))
    result["stderr"] = stderr
    result.update(buckets=[list(b) for b in buckets], loss=losses, windows=int(n), tokens=tokens, tolerance=tolerance)
    return result


def describe(result: Mapping[str, Any]) -> str:
    if result["degrades"]:
        return (f"the teacher's loss by position degrades from position {result['effective']} on "
                f"({result['worst_over_best']:.2f}x its best there): its effective context is about "
                f"{result['effective']} tokens")
    if result.get("status") == "not_enough_data":
        held = []
        if "thin_tokens" in result:
            held.append(f"{result['thin_tokens']:,} tokens")
        if "thin_count" in result:
            held.append(f"{result['thin_count']} documents or windows")
        need = (f" (a bucket needs {result.get('min_tokens', MIN_TOKENS):,} tokens from "
                f"{result.get('min_count', MIN_COUNT)} documents or windows)")
        if result.get("trusted_to"):
            seen = f"its loss by position does not degrade up to {result['trusted_to']} tokens"
            if "thin_from" in result:
                seen += (f", and positions from {result['thin_from']} on hold only {' from '.join(held)}{need}"
                         if held else f", and no text reaches position {result['thin_from']}")
        else:
            seen = f"no position bucket holds enough text: {' from '.join(held)}{need}" if held else \
                "fewer than two position buckets to compare"
        return f"not enough long text to tell the teacher's effective context: {seen}"
    return f"the teacher's loss by position does not degrade up to {result['measured_to']} tokens"
