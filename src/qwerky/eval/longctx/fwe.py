"""Frequent words extraction (RULER fwe): coded words drawn from a Zipf law (a=2); name the 3 most frequent.

There is no needle, so depth has no meaning (one row in the heatmap).
"""

from __future__ import annotations

import random
import string
from collections import Counter
from typing import Any

from .common import Sample, build_prompt, to_sample

MAX_NEW_TOKENS = 50
ALPHA = 2.0
VOCAB = 200
PREFIX = ("Read the following coded text and track the frequency of each coded word. "
          "Find the three most frequently appeared coded words.")
SUFFIX = ("Question: Do not provide any explanation. What are the three most frequently appeared words in the "
          "above coded text? Answer: According to the coded text above, the three most frequently appeared words are:")


def generate(tokenizer: Any, length: int, depth: float | None, rng: random.Random) -> Sample:
    vocab: list[str] = []
    while len(vocab) < VOCAB:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 6)))
        if word not in vocab:
            vocab.append(word)
    weights = [1.0 / (r + 1) ** ALPHA for r in range(VOCAB)]
    words = rng.choices(vocab, weights=weights, k=length)  # every word is >= 1 token: enough units
    built = build_prompt(tokenizer, length, PREFIX, SUFFIX, [], unit=lambda i: words[i], max_units=len(words))
    counts = Counter(words[:built.units])
    top = sorted(counts, key=lambda w: (-counts[w], vocab.index(w)))[:3]
    return to_sample("fwe", length, None, built, top, "string_match_all", MAX_NEW_TOKENS)
