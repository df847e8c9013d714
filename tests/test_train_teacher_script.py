"""scripts/train_teacher.py's synthetic retrieval documents (the long-document teacher's mixture)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_teacher.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_teacher", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_retrieval_documents_state_the_key_before_asking_for_it() -> None:
    tt = _script()
    texts = [f"line of document {d}\n" * 400 for d in range(5)]
    docs = tt.retrieval_documents(texts, 20, seed=0, min_chars=300, max_chars=3000)
    assert len(docs) == 20
    assert docs == tt.retrieval_documents(texts, 20, seed=0, min_chars=300, max_chars=3000)  # deterministic
    names = set()
    for doc in docs:
        question = re.search(r"\nWhat is the ([a-z ]+)\? The \1 is (\d+)\.$", doc)
        assert question, doc[-120:]
        name, key = question.group(1), question.group(2)
        names.add(name)
        stated = re.search(rf"[Tt]he {name} is {key}\.", doc)
        assert stated and stated.start() < question.start()  # the answer is only recoverable by looking back
    assert len(names) > 1  # several key names, not one template


def test_many_facts_are_all_stated_and_asked() -> None:
    tt = _script()
    texts = [f"line of document {d}\n" * 400 for d in range(5)]
    for doc in tt.retrieval_documents(texts, 10, seed=1, min_chars=300, max_chars=3000, facts=4):
        asked = re.findall(r"\nWhat is the ([a-z ]+)\? The \1 is (\d+)\.", doc)
        assert len(asked) == 4 and len({name for name, _ in asked}) == 4
        first_question = doc.index("\nWhat is the")
        for name, key in asked:
            assert doc.index(f"The {name} is {key}.") < first_question


def test_copy_rows_write_each_random_run_several_times_then_eos() -> None:
    import torch

    tt = _script()
    eos, vocab = 0, 50
    rows = tt.copy_rows(3, 200, vocab, torch.Generator().manual_seed(0), eos, min_run=4, max_run=12, copies=3)
    assert rows.shape == (3, 200)
    lengths = set()
    for row in rows.tolist():
        blocks = []
        cur: list[int] = []
        for t in row:
            if t == eos:
                blocks.append(cur)
                cur = []
            else:
                cur.append(t)
        assert len(blocks) > 3
        for block in blocks:  # every complete block is one run written three times
            n = len(block) // 3
            assert len(block) % 3 == 0 and 4 <= n <= 12 and block == block[:n] * 3, block
            lengths.add(n)
    assert len(lengths) > 2  # varied lengths: no fixed offset to learn instead of copying
    again = tt.copy_rows(3, 200, vocab, torch.Generator().manual_seed(0), eos, min_run=4, max_run=12, copies=3)
    assert torch.equal(rows, again)  # seeded


def test_with_copy_rows_replaces_only_the_asked_fraction_with_fresh_runs() -> None:
    import torch

    tt = _script()
    data = iter([torch.full((8, 64), 7), torch.full((8, 64), 7)])
    first, second = list(tt.with_copy_rows(data, 0.25, 100, 0, seed=0))
    assert (first[2:] == 7).all() and not (first[:2] == 7).all()
    assert not torch.equal(first[:2], second[:2])  # a fresh draw each batch: nothing to memorise
    assert list(tt.with_copy_rows(iter([torch.full((4, 8), 7)]), 0.0, 100, 0, seed=0))[0].eq(7).all()


def _tiny_corpus(tmp_path: Path) -> list[str]:
    import gzip
    import json

    docs = [" ".join(f"word{(d * 7 + i) % 50} is {i}." for i in range(60)) for d in range(12)]
    for name in ("train", "val"):
        with gzip.open(tmp_path / f"{name}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in docs)
    return ["--train", str(tmp_path / "train.jsonl.gz"), "--validation", str(tmp_path / "val.jsonl.gz"),
            "--tokenizer", str(Path(__file__).resolve().parents[1] / "src" / "qwerky" / "assets" / "teacher"),
            "--hidden-size", "32", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--intermediate-size", "64",
            "--seq-len", "64", "--batch-size", "4", "--warmup-steps", "1"]


def test_copy_warmup_then_mixed_copy_rows_train_and_are_recorded(tmp_path: Path) -> None:
    import json

    tt = _script()
    out = tmp_path / "teacher"
    tt.main(_tiny_corpus(tmp_path) + ["--steps", "4", "--copy-warmup-steps", "2", "--copy-fraction", "0.25",
                                      "--seq-len", "200", "--out", str(out)])
    summary = json.loads((out / "training.json").read_text())
    assert summary["steps"] == 4 and summary["copy_warmup_steps"] == 2 and summary["copy_fraction"] == 0.25
    assert summary["tokens_seen"] == 2 * 4 * 128 + 2 * 4 * 200  # warm-up rows are 128 tokens, not --seq-len
    assert (out / "model.safetensors").exists()


def test_copy_fraction_out_of_range_is_a_clear_error(tmp_path: Path) -> None:
    import pytest

    tt = _script()
    with pytest.raises(SystemExit, match="--copy-fraction must be in"):
        tt.main(_tiny_corpus(tmp_path) + ["--steps", "2", "--copy-fraction", "1.5", "--out", str(tmp_path / "t")])


def test_copy_warmup_yields_short_copy_batches_then_the_data_from_its_start() -> None:
    import torch

    tt = _script()
    data = iter([torch.full((4, 300), 1000), torch.full((4, 300), 1001)])  # outside the copy rows' vocab of 100
    out = list(tt.with_copy_warmup(data, 2, 4, 300, 100, 0, seed=0))
    assert [tuple(x.shape) for x in out] == [(4, 128), (4, 128), (4, 300), (4, 300)]
    assert (out[0] < 100).all() and (out[0] == 0).any()  # copy rows, with their eos separators
    assert (out[2] == 1000).all() and (out[3] == 1001).all()  # the data was not advanced during the warm-up
