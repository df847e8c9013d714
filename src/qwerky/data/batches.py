"""Packing and batches: a flat token stream -> seeded, resumable, rank-sharded batches.

Why this shape: the stream is cut into non-overlapping ``seq_len`` windows (documents run across
window boundaries, separated by eos), so no token is padding. Window order is a seeded
permutation per epoch, and the batch sequence is the concatenation of those permutations, so
the *global* batch at step k depends only on (tokens, seq_len, batch_size, seed) -- never on the
number of ranks. That makes runs reproducible, resumable to the exact step, and lets a run be
resumed on a different world size.

Sharding: rank ``r`` of ``world_size`` gets the contiguous rows
``[r * b, (r + 1) * b)`` of the global batch, ``b = batch_size // world_size``; concatenating
the ranks' batches in rank order gives the global batch.

Windows hold ``seq_len`` tokens; the model shifts labels internally (HF causal-LM convention), so
each window gives ``seq_len - 1`` next-token targets.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .recall import RecallRows
from .sources import DataError

__all__ = ["PackedBatches", "heldout_windows"]


def _as_windows(tokens: np.ndarray, seq_len: int, what: str) -> np.ndarray:
    """View the stream as ``[n_windows, seq_len]`` (the tail shorter than a window is dropped)."""
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    tokens = np.asarray(tokens)  # a memmap stays file-backed (a view, not a copy)
    if tokens.ndim != 1:
        raise DataError(f"{what} must be a flat 1-D token array, got shape {tuple(tokens.shape)}")
    n = tokens.shape[0] // seq_len
    if n == 0:
        raise DataError(
            f"{what} holds {tokens.shape[0]} tokens, fewer than one window of seq_len={seq_len}; "
            "add data or lower seq_len"
        )
    return tokens[: n * seq_len].reshape(n, seq_len)


class PackedBatches:
    """Endless iterator of ``LongTensor [batch_size // world_size, seq_len]`` batches.

    Args:
        tokens: flat token stream (e.g. ``TokenCache.train``, a uint32 memmap; not copied).
        seq_len: tokens per window (row).
        batch_size: *global* rows per step, over all ranks; must be divisible by ``world_size``.
        seed: seeds the per-epoch window permutations.
        rank, world_size: this process's slice of each global batch (contiguous rows).
        recall: optionally turns a seeded share of rows into recall rows (data/recall.py); which rows,
            and how, depends on each row's place in the global sequence, so resuming stays exact.

    The position is ``(epoch, index)``: the next window to use is entry ``index`` of epoch
    ``epoch``'s permutation. A batch may span an epoch boundary, so no window is ever skipped.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, recall: RecallRows | None = None) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size % world_size:
            raise DataError(f"global batch_size {batch_size} is not divisible by world_size {world_size}; "
                            "pick a multiple of the number of ranks")
        self.windows = _as_windows(tokens, seq_len, "the token stream")
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.local_batch_size = self.batch_size // self.world_size
        self.recall = recall
        self.epoch = 0
        self.index = 0
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    @property
    def num_windows(self) -> int:
        """Windows per epoch."""
        return self.windows.shape[0]

    @property
    def tokens_per_batch(self) -> int:
        """Tokens in one *global* batch (all ranks together), i.e. tokens consumed per step."""
        return self.batch_size * self.seq_len

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def _next_global_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """Window ids of the next global batch and each row's global counter; advances the position."""
        first = self.epoch * self.num_windows + self.index
        out = np.empty(self.batch_size, dtype=np.int64)
        filled = 0
        while filled < self.batch_size:
            perm = self._permutation(self.epoch)
            take = min(self.batch_size - filled, self.num_windows - self.index)
            out[filled: filled + take] = perm[self.index: self.index + take]
            filled += take
            self.index += take
            if self.index == self.num_windows:
                self.epoch, self.index = self.epoch + 1, 0
        return out, first + np.arange(self.batch_size)

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> torch.Tensor:
        ids, counters = self._next_global_indices()
        mine = slice(self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size)
        rows = self.windows[ids[mine]].astype(np.int64)  # [b, seq_len]; reads only this rank's rows
        if self.recall is not None:
            rows = self.recall.apply(rows, counters[mine])
        return torch.from_numpy(rows)

    def state_dict(self) -> dict[str, Any]:
        """The exact position plus what it is only valid for (checked on load)."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position; the next batches equal those the saved run would have seen.

        ``world_size``/``rank`` may differ from the saved run (global batches do not depend on
        them); seed, seq_len, batch_size and the number of windows must match.
        """
        for k in ("seed", "seq_len", "batch_size", "num_windows"):
            if k in state and int(state[k]) != getattr(self, k):
                raise DataError(f"cannot resume: saved {k}={state[k]} but this loader has "
                                f"{k}={getattr(self, k)}; use the same data and settings")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.num_windows:
            raise DataError(f"invalid loader position epoch={epoch}, index={index}")
        self.epoch, self.index = epoch, index


def heldout_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Deterministic evaluation windows: ``LongTensor [N, seq_len]``, ``N = min(max_windows, all)``.

    Windows are spread evenly over the stream (first and last included) rather than taken from
    the front, so a few windows still sample many held-out documents.
    """
    windows = _as_windows(tokens, seq_len, "the held-out token stream")
    n = windows.shape[0]
    if max_windows is not None:
        if max_windows < 1:
            raise DataError(f"max_windows must be >= 1, got {max_windows}")
        if max_windows < n:
            idx = np.linspace(0, n - 1, num=max_windows).round().astype(np.int64)
            return torch.from_numpy(windows[idx].astype(np.int64))
    return torch.from_numpy(windows.astype(np.int64))
