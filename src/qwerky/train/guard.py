"""The stage guard: a stage that makes the student worse is said so, and by default undone.

Users convert once, at great cost, and the last stage is not always the best: measured on a teacher
trained at 256 tokens whose config declares 2,048, stage 4 (1,024 tokens, KL against a teacher out of
its depth there) cost 4-11 points of top-1 agreement while KL moved by 1%. So each stage is judged on
held-out text at its own training context, the model after it against the model before it, on KL and
top-1 agreement together:

  worse = one metric got worse beyond its tolerance and the other did not get better beyond its own.

A trade (KL clearly better, agreement clearly worse) is not called a regression; a stage that buys
nothing on one metric and loses on the other is. With `train.keep: best` (the default) a regressed
stage's weights are replaced by the weights from before it, so the export is never worse than a stage
the run already had; `last` keeps them and only warns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GuardTolerance:
    kl_relative: float = 0.02  # KL may rise by 2% of its value before it counts as worse
    top1_points: float = 0.005  # top-1 agreement may fall by 0.5 points


def judge(before: dict[str, float], after: dict[str, float], tol: GuardTolerance) -> dict[str, Any]:
    """Compare two {"kl", "top1"} results of the same windows; returns the verdict with its reasons."""
    kl_change = (after["kl"] - before["kl"]) / max(before["kl"], 1e-12)
    top1_change = after["top1"] - before["top1"]
    kl_worse, kl_better = kl_change > tol.kl_relative, kl_change < -tol.kl_relative
    top1_worse, top1_better = top1_change < -tol.top1_points, top1_change > tol.top1_points
    regressed = (kl_worse and not top1_better) or (top1_worse and not kl_better)
    return {"regressed": bool(regressed), "kl_change_relative": kl_change, "top1_change": top1_change,
            "kl": [before["kl"], after["kl"]], "top1": [before["top1"], after["top1"]]}


def describe(stage: int, seq_len: int, verdict: dict[str, Any], action: str) -> str:
    """One line for the log and the report."""
    (kl0, kl1), (a0, a1) = verdict["kl"], verdict["top1"]
    word = "made the student worse" if verdict["regressed"] else "improved or held"
    return (f"stage {stage} {word} at its {seq_len}-token context: KL {kl0:.4f} -> {kl1:.4f} "
            f"({verdict['kl_change_relative']:+.1%}), top-1 {a0:.1%} -> {a1:.1%} "
            f"({verdict['top1_change'] * 100:+.1f} points); {action}")
