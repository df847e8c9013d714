"""Passkey retrieval in the Landmark-attention format: a 1..50000 key hidden in repeated noise."""

from __future__ import annotations

import random
from typing import Any

from .common import Sample, build_prompt, to_sample

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
QUESTION = "What is the pass key? The pass key is"
MAX_NEW_TOKENS = 10


def generate(tokenizer: Any, length: int, depth: float | None, rng: random.Random) -> Sample:
    key = rng.randint(1, 50000)
    info = f"The pass key is {key}. Remember it. {key} is the pass key."
    built = build_prompt(tokenizer, length, TASK, QUESTION, [(depth if depth is not None else 0.5, info)],
                         needle_sep="\n")
    return to_sample("passkey", length, depth, built, [str(key)], "passkey", MAX_NEW_TOKENS)
