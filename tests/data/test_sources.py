"""Sources: every supported input kind is read, and every bad input gives a helpful DataError."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from qwerky.data import DataError, read_documents
from qwerky.data import sources as sources_mod


def _write_jsonl(path: Path, records: list[dict], gz: bool = False) -> Path:
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def test_txt_is_one_document(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first para\n\nsecond para\n")
    assert list(read_documents(p)) == ["first para\n\nsecond para\n"]


def test_big_txt_split_on_blank_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(sources_mod, "TXT_SPLIT_BYTES", 10)
    p = tmp_path / "big.txt"
    p.write_text("doc one\nline two\n\n\n  \ndoc two\n\n\n")
    assert list(read_documents(p)) == ["doc one\nline two", "doc two"]


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl(tmp_path, gz):
    name = "d.jsonl.gz" if gz else "d.jsonl"
    p = _write_jsonl(tmp_path / name, [{"text": "alpha", "id": 1}, {"text": ""}, {"text": "beta"}], gz=gz)
    (p.parent / "ignored.md").write_text("not data")
    assert list(read_documents(p)) == ["alpha", "beta"]


def test_jsonl_custom_field(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"body": "x y"}])
    assert list(read_documents(p, text_field="body")) == ["x y"]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["one", None, "two"], "n": [1, 2, 3]}), p)
    assert list(read_documents(p)) == ["one", "two"]


def test_saved_hf_dataset(tmp_path):
    import datasets

    d = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["hf one", "hf two"], "id": [0, 1]}).save_to_disk(str(d))
    assert list(read_documents(d)) == ["hf one", "hf two"]
    # a saved dataset nested in a plain directory is found too, in sorted order
    (tmp_path / "a.txt").write_text("plain")
    assert list(read_documents(tmp_path)) == ["plain", "hf one", "hf two"]


def test_directory_sorted_recursive(tmp_path):
    (tmp_path / "b.txt").write_text("B")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "z.txt").write_text("AZ")
    _write_jsonl(tmp_path / "c.jsonl", [{"text": "C"}])
    (tmp_path / "notes.csv").write_text("skipped,in,directories")
    assert list(read_documents([tmp_path])) == ["AZ", "B", "C"]


def _error(paths, **kw) -> str:
    with pytest.raises(DataError) as info:
        list(read_documents(paths, **kw))
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_missing_path(tmp_path):
    msg = _error(tmp_path / "nope.jsonl")
    assert "does not exist" in msg and "nope.jsonl" in msg


def test_missing_path_fails_before_reading(tmp_path):
    with pytest.raises(DataError):
        read_documents([tmp_path / "nope.txt"])  # eager check, no iteration needed


def test_unsupported_extension(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text\nhello\n")
    msg = _error(p)
    assert "unsupported" in msg and ".csv" in msg and ".jsonl" in msg


def test_empty_file(tmp_path):
    p = tmp_path / "e.txt"
    p.write_text("  \n")
    assert "no non-empty documents" in _error(p)


def test_jsonl_only_empty_texts(tmp_path):
    p = _write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": "   "}])
    assert "no non-empty documents" in _error(p)


def test_empty_directory(tmp_path):
    assert "no supported data files" in _error(tmp_path)


def test_malformed_json_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    msg = _error(p)
    assert "bad.jsonl:3" in msg and "malformed JSON" in msg


def test_missing_text_field_lists_fields(tmp_path):
    p = _write_jsonl(tmp_path / "f.jsonl", [{"content": "x", "id": 3}])
    msg = _error(p)
    assert "'text'" in msg and "content, id" in msg and "text_field" in msg


def test_parquet_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["one"]}), p)
    msg = _error(p)
    assert "'text'" in msg and "body" in msg


def test_saved_dataset_missing_column(tmp_path):
    import datasets

    d = tmp_path / "saved"
    datasets.Dataset.from_dict({"content": ["x"]}).save_to_disk(str(d))
    msg = _error(d)
    assert "'text'" in msg and "content" in msg


def test_saved_dataset_dict_asks_for_split(tmp_path):
    import datasets

    d = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(d))
    msg = _error(d)
    assert "DatasetDict" in msg and "train" in msg


def test_bad_gzip(tmp_path):
    p = tmp_path / "d.jsonl.gz"
    p.write_text('{"text": "not compressed"}\n')
    assert "gzip" in _error(p)


def test_real_python_docs_validation():
    data = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    path = data / "python-docs-validation.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"shared data not available at {path} (only on development/CI machines)")
    docs = list(read_documents(path))
    assert len(docs) == 24
    assert all(isinstance(d, str) and d.strip() for d in docs)
