"""Long-context suite: passkey, RULER-style NIAH (single / multi-key / multi-value), variable tracking and
frequent words, sized in the model's own tokens, scored as RULER does; `run_longctx` runs several models on
the same prompts."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Any

from . import fwe, niah, passkey, vt
from .common import NOISE, Sample, build_prompt, spaced_depths
from .scoring import RULER_THRESHOLD, effective_length, passkey_match, string_match_all

GENERATORS: dict[str, Callable[[Any, int, float | None, random.Random], Sample]] = {
    "passkey": passkey.generate,
    "niah_single": functools.partial(niah.generate, variant="single"),
    "niah_multikey": functools.partial(niah.generate, variant="multikey"),
    "niah_multivalue": functools.partial(niah.generate, variant="multivalue"),
    "vt": vt.generate,
    "fwe": fwe.generate,
}
USES_DEPTH = {"passkey", "niah_single", "niah_multikey", "niah_multivalue", "vt"}
TASKS = tuple(GENERATORS)

__all__ = ["GENERATORS", "TASKS", "USES_DEPTH", "NOISE", "RULER_THRESHOLD", "Sample", "build_prompt",
           "effective_length", "make_samples", "passkey_match", "spaced_depths", "string_match_all"]


def make_samples(task: str, tokenizer: Any, lengths: list[int], depths: list[float], samples: int,
                 seed: int = 0) -> list[Sample]:
    """Seeded samples for every (length, depth, index); the same seed gives the same prompts."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    use_depths: list[float | None] = list(depths) if task in USES_DEPTH else [None]
    out = []
    for length in lengths:
        for di, depth in enumerate(use_depths):
            for s in range(samples):
                rng = random.Random(f"{seed}:{task}:{length}:{di}:{s}")
                out.append(GENERATORS[task](tokenizer, length, depth, rng))
    return out
