"""Shared pieces of the long-context generators: samples, the noise haystack, sizing in model tokens.

Every prompt is built to a requested length in the *model's own tokens*: filler units (sentences of the
noise haystack, or coded words) are added until one more would pass the length, so the final prompt is
at most `length` tokens and short of it by less than one unit. Needles go at a requested depth, a
fraction of the filler's tokens, again to within one unit.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NOISE_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again.")

ADJECTIVES = ("abundant", "bitter", "calm", "daring", "eager", "fancy", "gentle", "hollow", "icy", "jolly",
              "kind", "lively", "mellow", "narrow", "odd", "proud", "quiet", "rapid", "shiny", "tender",
              "vivid", "wooden", "young", "zealous", "brave", "clever", "dusty", "fierce", "grumpy", "humble")
NOUNS = ("apple", "bridge", "candle", "desert", "engine", "forest", "garden", "harbor", "island", "jacket",
         "kettle", "ladder", "meadow", "needle", "orange", "pencil", "quartz", "river", "saddle", "tunnel",
         "umbrella", "valley", "window", "yacht", "zebra", "anchor", "basket", "castle", "dolphin", "feather")


@dataclass
class Sample:
    """One prompt with its references; positions are in the model's tokens."""

    task: str
    length: int  # requested prompt length
    depth: float | None  # requested needle depth (fraction of the filler), None where it has no meaning
    prompt: str
    answers: list[str]
    metric: str  # "string_match_all" | "passkey"
    max_new_tokens: int
    n_tokens: int = 0  # actual prompt length
    needle_tokens: list[int] = field(default_factory=list)  # token index where each needle starts
    filler_tokens: int = 0  # tokens of filler in the prompt
    unit_tokens: int = 0  # tokens of the longest filler unit (the sizing tolerance)
    extra: dict[str, Any] = field(default_factory=dict)


def count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def noise_unit(i: int) -> str:
    return NOISE_SENTENCES[i % len(NOISE_SENTENCES)]


@dataclass
class Built:
    prompt: str
    n_tokens: int
    needle_tokens: list[int]
    filler_tokens: int
    unit_tokens: int
    units: int


def build_prompt(tokenizer: Any, length: int, prefix: str, suffix: str, inserts: Sequence[tuple[float, str]],
                 unit: Callable[[int], str] = noise_unit, sep: str = " ", needle_sep: str | None = None,
                 max_units: int | None = None) -> Built:
    """Prefix + filler units with `inserts` (depth, text) placed at their depths + suffix, at most `length` tokens.

    The prompt is prefix, "\\n", the filler (units joined by `sep`; each insert joined by `needle_sep`, default
    `sep`, before the unit where its depth falls), "\\n", suffix. The number of units is the largest that
    keeps the tokenised prompt within `length`.
    """
    needle_sep = sep if needle_sep is None else needle_sep
    inserts = sorted(inserts, key=lambda x: x[0])

    cache: list[int] = []

    def unit_counts(n: int) -> list[int]:
        """Tokens of each unit with its separator (cached: the same units are counted again and again)."""
        while len(cache) < n:
            i = len(cache)
            cache.append(count(tokenizer, (sep if i else "") + unit(i)))
        return cache[:n]

    def assemble(n: int) -> tuple[str, list[int]]:
        counts = unit_counts(n)
        cum = [0]
        for c in counts:
            cum.append(cum[-1] + c)
        total = cum[-1]
        # an insert at depth d goes before the first unit whose start is at or past d * total filler tokens
        slots = [min(n, bisect.bisect_left(cum, d * total)) if n else 0 for d, _ in inserts]
        items: list[tuple[bool, str]] = []  # (is_needle, text)
        for i in range(n + 1):
            items.extend((True, t) for (_, t), slot in zip(inserts, slots) if slot == i)
            if i < n:
                items.append((False, unit(i)))
        text = prefix + "\n"
        needle_chars: list[int] = []
        for j, (is_needle, piece) in enumerate(items):
            if j:
                text += needle_sep if is_needle or items[j - 1][0] else sep
            if is_needle:
                needle_chars.append(len(text))
            text += piece
        text += "\n" + suffix
        return text, needle_chars

    fixed = count(tokenizer, prefix + "\n" + needle_sep.join(t for _, t in inserts) + "\n" + suffix)
    if fixed > length:
        raise ValueError(f"length {length} is shorter than the task's fixed text ({fixed} tokens)")
    # estimate the number of units from their separate token counts, then adjust by whole units
    n, budget = 0, length - fixed
    while (max_units is None or n < max_units) and budget - unit_counts(n + 1)[-1] >= 0:
        budget -= cache[n]
        n += 1

    def size(m: int) -> int:
        return count(tokenizer, assemble(m)[0])

    cur = size(n)
    while cur > length and n > 0:
        n -= 1
        cur = size(n)
    while max_units is None or n < max_units:
        nxt = size(n + 1)
        if nxt > length:
            break
        n, cur = n + 1, nxt
    text, needle_chars = assemble(n)
    needle_tokens = [count(tokenizer, text[:c]) for c in needle_chars]
    filler = count(tokenizer, sep.join(unit(i) for i in range(n))) if n else 0
    longest = max(unit_counts(n) or [0]) + count(tokenizer, needle_sep) + 1
    return Built(text, cur, needle_tokens, filler, longest, n)


def spaced_depths(n: int) -> list[float]:
    """n evenly spaced depths from 0 to 1 (RULER uses 40 points over 0-100%)."""
    if n < 1:
        raise ValueError(f"need at least one depth, got {n}")
    return [0.5] if n == 1 else [i / (n - 1) for i in range(n)]


def to_sample(task: str, length: int, depth: float | None, built: Built, answers: list[str], metric: str,
              max_new_tokens: int, **extra: Any) -> Sample:
    return Sample(task=task, length=length, depth=depth, prompt=built.prompt, answers=answers, metric=metric,
                  max_new_tokens=max_new_tokens, n_tokens=built.n_tokens, needle_tokens=built.needle_tokens,
                  filler_tokens=built.filler_tokens, unit_tokens=built.unit_tokens, extra=extra)
