"""Tokenised cache: tokenise the corpus once, store each split as a flat uint32 memmap.

Why: distillation stages re-read the same tokens for hours on many ranks; tokenising once and
memory-mapping a flat array makes every later read free and identical across runs and ranks.

Layout of one cache entry (``cache_dir/<key>/``)::

    train.bin     uint32 token ids, documents concatenated, eos after every document
    heldout.bin   the same for the held-out split
    meta.json     counts, tokenizer identity, source sizes/mtimes, split settings

The key hashes everything the content depends on (source paths, sizes and mtimes; tokenizer
vocabulary size and a hash of its serialised form; held-out fraction and seed; text field), so a
re-run with the same inputs re-uses the entry without tokenising, and any change builds a new one.
An entry is built in a temporary folder and moved into place with one ``os.replace``, so readers
never see a half-written cache.

Held-out split: a document goes to held-out when a seeded hash of its text falls below the
fraction, so the split is independent of file order and duplicates never straddle the split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .sources import DataError, PathLike, Source, iter_source, resolve_sources

__all__ = ["TokenCache", "build_token_cache", "document_score", "tokenizer_identity"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
_DTYPE = np.uint32
_BATCH_DOCS = 256
_BATCH_CHARS = 8_000_000


@dataclass
class TokenCache:
    """A built cache entry: the two splits as read-only uint32 memmaps plus their metadata."""

    train: np.ndarray = field(repr=False)
    """Training tokens (``np.memmap``, or an empty array when the split has no tokens)."""
    heldout: np.ndarray = field(repr=False)
    """Held-out tokens, same format."""
    meta: dict[str, Any]
    """Contents of ``meta.json``."""
    path: Path
    """The entry's folder."""

    @classmethod
    def load(cls, path: PathLike) -> TokenCache:
        """Open an existing entry; ``DataError`` if it is missing or its files do not match meta."""
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise DataError(f"{path} is not a token cache (no meta.json); build it with build_token_cache")
        meta = json.loads(meta_file.read_text())
        arrays = {}
        for split in ("train", "heldout"):
            n = int(meta["splits"][split]["tokens"])
            file = path / f"{split}.bin"
            if not file.is_file() or file.stat().st_size != n * np.dtype(_DTYPE).itemsize:
                raise DataError(f"token cache {path} is corrupt ({file.name} does not hold {n} tokens); "
                                "delete the folder to rebuild it")
            arrays[split] = np.memmap(file, dtype=_DTYPE, mode="r", shape=(n,)) if n else np.zeros(0, _DTYPE)
        return cls(train=arrays["train"], heldout=arrays["heldout"], meta=meta, path=path)


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What identifies a tokenizer's output: vocab size, eos id and a hash of its serialised form."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        blob = backend.to_str()
    else:  # slow tokenizer: the vocabulary (incl. added tokens) is what we can hash
        blob = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {
        "name": str(getattr(tokenizer, "name_or_path", "") or ""),
        "vocab_size": len(tokenizer),
        "vocab_hash": hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16],
        "eos_token_id": getattr(tokenizer, "eos_token_id", None),
    }


def document_score(text: str, seed: int) -> float:
    """A seeded hash of a document mapped to [0, 1): below the fraction means held-out."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(int(seed)).encode())
    return int.from_bytes(h.digest(), "big") / 2.0**64


def _fingerprint(sources: list[Source]) -> list[dict[str, Any]]:
    out = []
    for source in sources:
        for f in source.files():
            st = f.stat()
            out.append({"path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _iter_docs(sources: list[Source], text_field: str) -> Iterator[str]:
    for source in sources:
        yield from iter_source(source, text_field)


def _batched(docs: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class _SplitWriter:
    """Appends tokenised documents of one split to a raw uint32 file."""

    def __init__(self, path: Path) -> None:
        self.fh = open(path, "wb")
        self.tokens = 0
        self.docs = 0

    def write(self, ids: list[int], eos: int) -> None:
        arr = np.empty(len(ids) + 1, dtype=_DTYPE)
        arr[:-1] = ids
        arr[-1] = eos
        self.fh.write(arr.tobytes())
        self.tokens += arr.size
        self.docs += 1

    def close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


def _encode(tokenizer: Any, batch: list[str]) -> list[list[int]]:
    """Batched fast tokenisation, no special tokens (the eos separator is added by the caller)."""
    enc = tokenizer(batch, add_special_tokens=False, return_attention_mask=False,
                    return_token_type_ids=False)
    return enc["input_ids"]


def _plan_split(sources: list[Source], text_field: str, seed: int) -> tuple[int, float, float]:
    """First pass over the documents: their count and the lowest and highest split score."""
    n = 0
    lo, hi = 1.0, 0.0
    for doc in _iter_docs(sources, text_field):
        s = document_score(doc, seed)
        n += 1
        lo, hi = min(lo, s), max(hi, s)
    return n, lo, hi


def _make_router(fraction: float, lo: float, hi: float, seed: int) -> Callable[[str], str]:
    """Split rule: held-out iff ``score < fraction``, corrected so both splits are non-empty.

    If the threshold would hold out nothing (fraction > 0), the lowest-scoring document is held
    out; if it would hold out everything, the highest-scoring one is kept for training. Neither
    correction applies when all documents score the same (identical texts cannot be split).
    """
    distinct = lo < hi
    none_held = fraction > 0 and lo >= fraction and distinct
    all_held = hi < fraction and distinct

    def route(doc: str) -> str:
        s = document_score(doc, seed)
        if s < fraction:
            return "train" if all_held and s >= hi else "heldout"
        return "heldout" if none_held and s <= lo else "train"

    return route


def build_token_cache(
    paths: PathLike | Iterable[PathLike],
    tokenizer: Any,
    cache_dir: PathLike,
    heldout_paths: PathLike | Iterable[PathLike] | None = None,
    heldout_fraction: float = 0.02,
    seed: int = 0,
    text_field: str = "text",
) -> TokenCache:
    """Tokenise ``paths`` once with the teacher's tokenizer and return the cached splits.

    Every document is followed by the tokenizer's eos id. Without ``heldout_paths`` a seeded hash
    of each document's text picks about ``heldout_fraction`` of them for held-out (at least one
    when there are two or more distinct documents and the fraction is positive); with
    ``heldout_paths`` those files are the held-out split and all of ``paths`` is training data.
    A second call with the same inputs returns the existing entry without tokenising.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise DataError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no eos token, which qwerky uses to separate documents; "
                        "set tokenizer.eos_token (e.g. to the teacher's end-of-text token)")
    ident = tokenizer_identity(tokenizer)
    if ident["vocab_size"] > np.iinfo(_DTYPE).max:
        raise DataError(f"vocabulary of {ident['vocab_size']} tokens does not fit uint32 token ids")

    train_sources = resolve_sources(paths)
    held_sources = resolve_sources(heldout_paths) if heldout_paths is not None else []
    fraction = None if heldout_paths is not None else float(heldout_fraction)
    key_material = {
        "format": CACHE_FORMAT,
        "sources": _fingerprint(train_sources),
        "heldout_sources": _fingerprint(held_sources),
        "tokenizer": {k: ident[k] for k in ("vocab_size", "vocab_hash", "eos_token_id")},
        "heldout_fraction": fraction,
        "seed": int(seed),
        "text_field": text_field,
    }
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:20]
    cache_dir = Path(cache_dir)
    final = cache_dir / key
    if (final / "meta.json").is_file():
        try:
            cache = TokenCache.load(final)
            logger.info("re-using token cache %s", final)
            return cache
        except DataError as e:
            logger.warning("%s; rebuilding", e)
            shutil.rmtree(final, ignore_errors=True)

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        meta = _build(tmp, train_sources, held_sources, tokenizer, int(eos), fraction, int(seed), text_field)
        meta.update(key=key, tokenizer=ident, **{k: key_material[k] for k in
                    ("format", "sources", "heldout_sources", "heldout_fraction", "seed", "text_field")})
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same entry first: use theirs
            if not (final / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("built token cache %s (%d train / %d held-out tokens)", final,
                meta["splits"]["train"]["tokens"], meta["splits"]["heldout"]["tokens"])
    return TokenCache.load(final)


def _build(tmp: Path, train_sources: list[Source], held_sources: list[Source], tokenizer: Any, eos: int,
           fraction: float | None, seed: int, text_field: str) -> dict[str, Any]:
    """Tokenise into ``tmp/{train,heldout}.bin``; return the split counts for meta."""
    writers = {"train": _SplitWriter(tmp / "train.bin"), "heldout": _SplitWriter(tmp / "heldout.bin")}
    started = time.time()
    try:
        if fraction is None:
            jobs = [(train_sources, lambda _doc: "train"), (held_sources, lambda _doc: "heldout")]
            total = None
        else:
            total, lo, hi = _plan_split(train_sources, text_field, seed)
            jobs = [(train_sources, _make_router(fraction, lo, hi, seed))]
        with tqdm(total=total, unit="doc", desc="tokenising", disable=None) as bar:
            for sources, route_fn in jobs:
                for batch in _batched(_iter_docs(sources, text_field)):
                    for doc, ids in zip(batch, _encode(tokenizer, batch)):
                        writers[route_fn(doc)].write(ids, eos)
                    bar.update(len(batch))
    finally:
        for w in writers.values():
            w.close()
    if writers["train"].tokens == 0:
        raise DataError("no training documents left after the held-out split; "
                        "add data or lower heldout_fraction")
    n_docs = sum(w.docs for w in writers.values())
    logger.info("tokenised %d documents in %.1fs", n_docs, time.time() - started)
    return {
        "dtype": "uint32",
        "splits": {name: {"tokens": w.tokens, "docs": w.docs} for name, w in writers.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
