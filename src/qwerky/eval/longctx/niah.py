"""Needle in a haystack in RULER's formats on the noise haystack: single, multi-key and multi-value.

Needle: "One of the special magic numbers for {key} is: {value}." with word-pair keys and 7-digit values.
single: one needle. multikey: the queried needle among 3 distractor needles with other keys (at random
depths). multivalue: 4 needles with the same key, all values must be recalled.
"""

from __future__ import annotations

import random
from typing import Any

from .common import ADJECTIVES, NOUNS, Sample, build_prompt, to_sample

MAX_NEW_TOKENS = 128
PREFIX = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
          "I will quiz you about the numbers afterwards.")
NUM_NEEDLES = 4


def _key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in taken:
            taken.add(key)
            return key


def _value(rng: random.Random, taken: set[str]) -> str:
    while True:
        value = str(rng.randint(1_000_000, 9_999_999))
        if value not in taken:
            taken.add(value)
            return value


def needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def question(key: str) -> str:
    return (f"What are all the special magic numbers for {key} mentioned in the provided text? "
            f"The special magic numbers for {key} mentioned in the provided text are")


def generate(tokenizer: Any, length: int, depth: float | None, rng: random.Random, variant: str = "single") -> Sample:
    depth = 0.5 if depth is None else depth
    keys: set[str] = set()
    values: set[str] = set()
    key = _key(rng, keys)
    answer = _value(rng, values)
    inserts = [(depth, needle(key, answer))]
    answers = [answer]
    if variant == "multikey":
        inserts += [(rng.random(), needle(_key(rng, keys), _value(rng, values))) for _ in range(NUM_NEEDLES - 1)]
    elif variant == "multivalue":
        more = [_value(rng, values) for _ in range(NUM_NEEDLES - 1)]
        inserts += [(rng.random(), needle(key, v)) for v in more]
        answers += more
    elif variant != "single":
        raise ValueError(f"unknown niah variant {variant!r}")
    built = build_prompt(tokenizer, length, PREFIX, question(key), inserts)
    # the queried (first) needle's token position, whatever order the needles ended up in
    order = sorted(range(len(inserts)), key=lambda i: inserts[i][0])
    target = built.needle_tokens[order.index(0)]
    return to_sample(f"niah_{variant}", length, depth, built, answers, "string_match_all", MAX_NEW_TOKENS,
                     target_token=target, key=key)
