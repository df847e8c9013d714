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

Stage 1 is judged and reported but not undone (unless its KL is not finite): it aligns each layer with
its own attention block, a warm start for stage 2, and the end-to-end KL right after it is not what it
optimises. Undoing it is measured to hurt: on the long-document teacher (long_context_cpu at 0.3x) stage
1 moved KL from 2.03 to 2.96, and the run that kept it ended at KL 0.241 / top-1 60.4% where the run that
undid it ended at 0.362 / 51.5%.
"""

from __future__ import annotations

import math
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
    regressed = regressed or not (math.isfinite(after["kl"]) and math.isfinite(after["top1"]))  # a diverged stage
    return {"regressed": bool(regressed), "kl_change_relative": kl_change, "top1_change": top1_change,
            "kl": [before["kl"], after["kl"]], "top1": [before["top1"], after["top1"]]}


WARM_START_STAGES = (1,)  # judged and reported, undone only when the result is not finite


def decide(stage: int, verdict: dict[str, Any], keep: str, can_undo: bool) -> tuple[bool, str]:
    """(undo?, what was done) for a judged stage; `can_undo` is whether the weights from before it exist."""
    if not verdict["regressed"]:
        return False, "accepted"
    if keep == "last":
        return False, "kept anyway (train.keep=last)"
    finite = all(math.isfinite(x) for x in (*verdict["kl"], *verdict["top1"]))
    if stage in WARM_START_STAGES and finite:
        return False, (f"kept: stage {stage} is a warm start (each layer aligned on its own); what counts is "
                       f"what stage {stage + 1} makes of it, and undoing it was measured to hurt")
    if not can_undo:
        return False, "kept: the stage was resumed mid-way, so the weights from before it are gone"
    return True, "undone"


def describe(stage: int, seq_len: int, verdict: dict[str, Any], action: str) -> str:
    """One line for the log and the report."""
    (kl0, kl1), (a0, a1) = verdict["kl"], verdict["top1"]
    word = "made the student worse" if verdict["regressed"] else "improved or held"
    return (f"stage {stage} {word} at its {seq_len}-token context: KL {kl0:.4f} -> {kl1:.4f} "
            f"({verdict['kl_change_relative']:+.1%}), top-1 {a0:.1%} -> {a1:.1%} "
            f"({verdict['top1_change'] * 100:+.1f} points); {action}")
