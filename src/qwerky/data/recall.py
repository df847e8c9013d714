"""Recall rows: a passage of the row's own text written again after a gap longer than the student's window.

Why: on ordinary text few tokens depend on anything more than a few dozen tokens back, so distillation
hardly ever shows a student what the teacher does with a distant token. A teacher copies a passage it has
already read (its induction heads make the second copy almost free to predict), so on a recall row the
teacher's logits over the second copy (and, in stage 1, its attention outputs) are a dense lesson in
reading from far back, the one thing a window cannot do and a recurrent state must learn. The text is the
user's own: this works for any teacher, tokenizer and corpus.

A row of length T becomes  prefix | X | gap | X | rest,  all cut from the original window:

    X    = `length` tokens starting at `start` (length uniform in [T/16, T/4], start in [0, 16])
    gap  = the text that followed X, `gap` tokens (at least `min_gap`)
    rest = the text that followed the gap, to fill the row

Which rows become recall rows, and their shapes, depend only on (seed, the row's global counter), so
batches stay reproducible, resumable and independent of the number of ranks.
"""

from __future__ import annotations

import numpy as np

from .sources import DataError

__all__ = ["RecallRows"]


class RecallRows:
    """Turn a seeded `fraction` of rows into recall rows (see the module docstring)."""

    def __init__(self, fraction: float, min_gap: int, seq_len: int, seed: int = 0) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise DataError(f"recall fraction must be in [0, 1], got {fraction}")
        if min_gap < 1:
            raise DataError(f"recall min_gap must be >= 1, got {min_gap}")
        longest = self.tokens_needed(seq_len, min_gap)
        if fraction and longest > seq_len:
            raise DataError(f"a recall row needs at least {longest} tokens (two passages and a gap of {min_gap}); "
                            f"seq_len {seq_len} is too short: lower data.recall_min_gap or raise seq_len")
        self.fraction, self.min_gap, self.seq_len, self.seed = float(fraction), int(min_gap), int(seq_len), int(seed)

    @staticmethod
    def tokens_needed(seq_len: int, min_gap: int) -> int:
        """The shortest row that holds the latest start, two shortest passages and the gap."""
        return 16 + 2 * max(1, seq_len // 16) + min_gap

    def layout(self, counter: int) -> tuple[int, int, int] | None:
        """(start, length, gap) for the row with this global counter, or None to leave it as it is."""
        if not self.fraction:
            return None
        rng = np.random.default_rng([self.seed, 0x5EC, int(counter)])
        if rng.random() >= self.fraction:
            return None
        T = self.seq_len
        start = int(rng.integers(0, 17))
        length = int(rng.integers(max(1, T // 16), max(1, T // 4) + 1))
        length = min(length, (T - start - self.min_gap) // 2)
        gap = int(rng.integers(self.min_gap, T - start - 2 * length + 1))
        return start, length, gap

    def apply(self, rows: np.ndarray, counters: np.ndarray) -> np.ndarray:
        """rows [b, T] (int64), counters [b]: a copy with the chosen rows rewritten."""
        out = rows.copy()
        for i, c in enumerate(counters):
            lay = self.layout(int(c))
            if lay is None:
                continue
            start, length, gap = lay
            row = rows[i]
            passage = row[start:start + length]
            first_end = start + length + gap
            rebuilt = np.concatenate([row[:first_end], passage, row[first_end:]])
            out[i] = rebuilt[: rows.shape[1]]
        return out
