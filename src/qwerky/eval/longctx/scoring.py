"""Scoring as RULER and the passkey test do it."""

from __future__ import annotations

import re
from collections.abc import Sequence

RULER_THRESHOLD = 85.6
"""RULER's effective-length threshold: Llama-2-7B's average score at 4k tokens."""

_INT = re.compile(r"\d+")


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Share of references found in the prediction (case-insensitive substring), 0..1 (RULER niah/vt/cwe/fwe)."""
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    pred = prediction.lower()
    return sum(ref.lower() in pred for ref in references) / len(references)


def passkey_match(prediction: str, key: str | int) -> float:
    """1.0 when the first integer in the prediction equals the pass key (Landmark attention's test)."""
    m = _INT.search(prediction)
    return float(m is not None and int(m.group()) == int(key))


def score(metric: str, prediction: str, references: Sequence[str]) -> float:
    if metric == "passkey":
        return passkey_match(prediction, references[0])
    if metric == "string_match_all":
        return string_match_all(prediction, references)
    raise ValueError(f"unknown metric {metric!r}")


def effective_length(lengths: Sequence[int], accuracy: Sequence[float | None],
                     threshold: float = RULER_THRESHOLD) -> int | None:
    """Longest tested length whose accuracy (percent) and that of every shorter length exceed the threshold.

    RULER defines the effective length as the longest length still above 85.6; requiring the shorter
    lengths too keeps one lucky long length from counting. None when even the shortest fails.
    """
    best = None
    for length, acc in sorted(zip(lengths, accuracy)):
        if acc is None or acc < threshold:
            break
        best = length
    return best
