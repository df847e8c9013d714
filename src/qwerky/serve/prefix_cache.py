"""Prefix state cache: reuse the recurrent state at the end of a shared prompt prefix.

A converted model's state after N tokens is a fixed-size snapshot of everything it needs about those
tokens, so two prompts that share their first N tokens can share that snapshot: the second one prefills
only its own suffix. States are saved at block boundaries (every `block_tokens` tokens) under a chained
hash of the token prefix, so a lookup finds the longest cached block-prefix of a new prompt. Memory is
bounded in bytes (each entry costs `state.nbytes()`), least recently used entries go first.

Used from the engine's loop thread only; the lock just keeps `stats()` consistent for other threads.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any


class PrefixStateCache:
    """LRU map: hash(token prefix of k * block_tokens) -> state (batch 1) after that prefix."""

    def __init__(self, max_bytes: int, block_tokens: int = 64) -> None:
        if block_tokens < 1:
            raise ValueError("block_tokens must be >= 1")
        self.max_bytes = max(0, int(max_bytes))
        self.block_tokens = int(block_tokens)
        self._entries: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.hit_tokens = 0
        self.inserts = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def block_keys(self, token_ids: Sequence[int]) -> list[bytes]:
        """keys[i] identifies the prefix token_ids[:(i + 1) * block_tokens] (full blocks only).

        Chained so that computing every key of a prompt costs one pass over it.
        """
        keys: list[bytes] = []
        digest = b""
        bt = self.block_tokens
        for end in range(bt, len(token_ids) + 1, bt):
            block = ",".join(str(int(t)) for t in token_ids[end - bt:end]).encode()
            digest = hashlib.blake2b(digest + b"|" + block, digest_size=16).digest()
            keys.append(digest)
        return keys

    def lookup(self, keys: Sequence[bytes]) -> tuple[int, Any | None]:
        """(tokens covered, a private clone of the state) for the longest cached prefix; (0, None) on a miss."""
        if not self.enabled:
            return 0, None
        with self._lock:
            for i in range(len(keys) - 1, -1, -1):
                entry = self._entries.get(keys[i])
                if entry is not None:
                    self._entries.move_to_end(keys[i])
                    covered = (i + 1) * self.block_tokens
                    self.hits += 1
                    self.hit_tokens += covered
                    # the engine mutates its state in place (window caches), so never hand out the stored one
                    return covered, entry[0].clone()
            self.misses += 1
        return 0, None

    def insert(self, key: bytes, state: Any) -> bool:
        """Store `state` (the caller passes a clone it will not touch again); False if it cannot fit."""
        if not self.enabled:
            return False
        size = int(state.nbytes())
        if size > self.max_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (state, size)
            self._bytes += size
            self.inserts += 1
            while self._bytes > self.max_bytes and self._entries:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
                self.evictions += 1
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "block_tokens": self.block_tokens, "hits": self.hits, "misses": self.misses,
                    "hit_tokens": self.hit_tokens, "inserts": self.inserts, "evictions": self.evictions}
