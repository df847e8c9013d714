"""Variable tracking (RULER vt): one chain "VAR A = 12345. VAR B = VAR A. ..." hidden in noise.

The chain starts at the requested depth; its later hops are spread evenly between there and the end.
All variables of the chain must be named.
"""

from __future__ import annotations

import random
import string
from typing import Any

from .common import Sample, build_prompt, to_sample

MAX_NEW_TOKENS = 30
NUM_HOPS = 4
PREFIX = "Memorize and track the chain(s) of variable assignment hidden in the following text."


def generate(tokenizer: Any, length: int, depth: float | None, rng: random.Random) -> Sample:
    depth = 0.5 if depth is None else depth
    names: list[str] = []
    while len(names) < NUM_HOPS + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(NUM_HOPS)]
    inserts = [(depth + (1 - depth) * i / (NUM_HOPS + 1), text) for i, text in enumerate(chain)]
    suffix = (f"Question: Find all variables that are assigned the value {value} in the text above. "
              f"Answer: According to the chain(s) of variable assignment in the text above, {NUM_HOPS + 1} "
              f"variables are assigned the value {value}, they are:")
    built = build_prompt(tokenizer, length, PREFIX, suffix, inserts)
    return to_sample("vt", length, depth, built, names, "string_match_all", MAX_NEW_TOKENS,
                     target_token=built.needle_tokens[0])
