"""Document sources: turn user-given paths into a stream of text documents.

Supported inputs (everything yields plain ``str`` documents, empty/whitespace-only ones skipped):

- ``.txt``: one file is one document; a file above ``TXT_SPLIT_BYTES`` is split on runs of blank
  lines so a single huge dump does not become one giant document.
- ``.jsonl`` / ``.jsonl.gz``: one JSON object per line, text in ``text_field`` (default ``text``).
- ``.parquet``: the ``text_field`` column.
- a directory written by ``datasets.Dataset.save_to_disk``: the ``text_field`` column.
- any other directory: every supported file below it, sorted by relative path.

Bad input raises :class:`DataError` with a one-line message naming the problem and the fix, and
path problems (missing, unsupported) are reported before any document is read.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from qwerky.errors import QwerkyError

__all__ = [
    "DataError",
    "Source",
    "SUPPORTED_SUFFIXES",
    "TXT_SPLIT_BYTES",
    "iter_source",
    "read_documents",
    "resolve_sources",
]

SUPPORTED_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
"""File name endings read by :func:`read_documents` (a saved HF dataset is a directory)."""

TXT_SPLIT_BYTES: int = 4 * 1024 * 1024
"""A ``.txt`` file larger than this is split on blank-line runs into several documents."""

_BLANK_RUN = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_BATCH_ROWS = 1024

PathLike = str | os.PathLike


class DataError(QwerkyError, ValueError):
    """Bad or unreadable training data; the message names the problem and how to fix it."""


@dataclass(frozen=True)
class Source:
    """One resolved input: a file or a saved HF dataset directory."""

    path: Path
    kind: str  # "txt" | "jsonl" | "jsonl.gz" | "parquet" | "hf_dataset"

    def files(self) -> list[Path]:
        """The files whose size and mtime identify this source's content (for cache keys)."""
        if self.kind != "hf_dataset":
            return [self.path]
        return sorted(p for p in self.path.rglob("*") if p.is_file())


def _kind_of_file(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix[1:]
    return None


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _is_saved_dataset_dict(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file()


def _check_saved_dataset_dict(path: Path) -> None:
    if _is_saved_dataset_dict(path):
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DataError(
            f"{path} is a saved DatasetDict with splits {splits}; pass one split folder instead, "
            f"e.g. {path / (splits[0] if splits else 'train')}"
        )


def _scan_directory(root: Path) -> list[Source]:
    """Supported files and saved datasets below ``root``, sorted by relative path."""
    found: list[Source] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in list(dirnames):
            sub = here / d
            _check_saved_dataset_dict(sub)
            if _is_saved_dataset(sub):
                found.append(Source(sub, "hf_dataset"))
                dirnames.remove(d)
        for f in filenames:
            kind = _kind_of_file(here / f)
            if kind is not None and not f.startswith("."):
                found.append(Source(here / f, kind))
    found.sort(key=lambda s: s.path.relative_to(root).as_posix())
    if not found:
        raise DataError(
            f"directory {root} contains no supported data files; add files ending in "
            f"{', '.join(SUPPORTED_SUFFIXES)} or pass a folder written by Dataset.save_to_disk"
        )
    return found


def resolve_sources(paths: PathLike | Iterable[PathLike]) -> list[Source]:
    """Expand user paths into sources, checking existence and type up front.

    Raises ``DataError`` for a missing path, an unsupported file type, a saved ``DatasetDict``
    (ambiguous split) or a directory without supported files.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    items = [Path(p) for p in paths]
    if not items:
        raise DataError("no data paths given; pass at least one file or directory")
    sources: list[Source] = []
    for path in items:
        if not path.exists():
            raise DataError(f"data path {path} does not exist; check the path (relative to {Path.cwd()})")
        if path.is_dir():
            _check_saved_dataset_dict(path)
            if _is_saved_dataset(path):
                sources.append(Source(path, "hf_dataset"))
            else:
                sources.extend(_scan_directory(path))
            continue
        kind = _kind_of_file(path)
        if kind is None:
            raise DataError(
                f"unsupported data file {path} (type '{''.join(path.suffixes) or path.name}'); "
                f"supported: {', '.join(SUPPORTED_SUFFIXES)} or a Dataset.save_to_disk folder; "
                f"convert it, e.g. to .jsonl with one {{\"text\": ...}} object per line"
            )
        sources.append(Source(path, kind))
    return sources


def _read_txt(path: Path) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 (byte {e.start}); re-encode it as UTF-8") from e
    if path.stat().st_size > TXT_SPLIT_BYTES:
        yield from _BLANK_RUN.split(text)
    else:
        yield text


def _field_value(record: object, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: expected a JSON object with a '{field}' field, got {type(record).__name__}"
        )
    if field not in record:
        fields = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(
            f"{where}: no '{field}' field (fields present: {fields}); "
            f"pass text_field=<one of those> or add a '{field}' field"
        )
    value = record[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' is {type(value).__name__}, expected a string")
    return value


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                        "fix or remove that line (one JSON object per line)"
                    ) from e
                yield _field_value(record, field, f"{path}:{lineno}")
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(
            f"{path} is not a valid gzip file ({e}); re-compress it or rename it to .jsonl"
        ) from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 text; re-encode it as UTF-8") from e


def _check_column(names: Sequence[str], field: str, where: str) -> None:
    if field not in names:
        raise DataError(
            f"{where}: no '{field}' column (columns: {', '.join(names) or 'none'}); "
            f"pass text_field=<one of those> or rename the column to '{field}'"
        )


def _string_rows(values: list, field: str, where: str) -> Iterator[str]:
    for v in values:
        if v is None:
            continue
        if not isinstance(v, str):
            raise DataError(f"{where}: column '{field}' holds {type(v).__name__} values, expected strings")
        yield v


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path} is not a readable parquet file ({e}); re-export it") from e
    _check_column(pf.schema_arrow.names, field, str(path))
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=[field]):
        yield from _string_rows(batch.column(0).to_pylist(), field, str(path))


def _read_hf_dataset(path: Path, field: str) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several unrelated types for a broken folder
        raise DataError(f"{path} could not be loaded as a saved dataset ({e}); re-run save_to_disk") from e
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path} is a saved DatasetDict; pass one split folder, e.g. {path / 'train'}")
    _check_column(list(ds.column_names), field, str(path))
    for batch in ds.select_columns([field]).iter(batch_size=_BATCH_ROWS):
        yield from _string_rows(batch[field], field, str(path))


def _read_source(source: Source, field: str) -> Iterator[str]:
    if source.kind == "txt":
        return _read_txt(source.path)
    if source.kind in ("jsonl", "jsonl.gz"):
        return _read_jsonl(source.path, field)
    if source.kind == "parquet":
        return _read_parquet(source.path, field)
    return _read_hf_dataset(source.path, field)


def iter_source(source: Source, text_field: str = "text") -> Iterator[str]:
    """Non-empty documents of one source; ``DataError`` if it has none."""
    n = 0
    for doc in _read_source(source, text_field):
        if doc.strip():
            n += 1
            yield doc
    if n == 0:
        raise DataError(
            f"{source.path} contains no non-empty documents; remove it from the inputs or fill it"
        )


def read_documents(paths: PathLike | Iterable[PathLike], text_field: str = "text") -> Iterator[str]:
    """Yield every non-empty document of ``paths`` in a deterministic order.

    Paths are resolved and checked immediately (so a typo fails before any work); contents are
    read lazily. ``text_field`` names the JSON field / column holding the text.
    """
    sources = resolve_sources(paths)

    def _gen() -> Iterator[str]:
        for source in sources:
            yield from iter_source(source, text_field)

    return _gen()
