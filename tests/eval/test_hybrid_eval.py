"""Hybrids (some layers keep the teacher's attention with a growing KV cache) through `qwerky eval` and
`qwerky longctx`: a hybrid keeping every layer is the teacher itself, and one keeping a single layer runs
the long-context suite with its recurrent layers carried as state and its kept layer as a cache."""

from __future__ import annotations

import argparse
import json

import pytest

from qwerky.eval.cli import add_eval_arguments, add_longctx_arguments, eval_main, longctx_main
from qwerky.surgery import convert_teacher, save_student
from qwerky.teacher import load_teacher

TEXT = "A hybrid keeps a few attention layers and converts the rest to a fixed-size recurrent state. "


@pytest.mark.parametrize("kept", [[0, 1], [1]])
def test_eval_and_longctx_run_hybrids(teacher_dir, tokenizer, tmp_path, kept: list[int]) -> None:
    folder = save_student(convert_teacher(load_teacher(teacher_dir), attention_layers=kept), tokenizer,
                          tmp_path / "hybrid")
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"text": TEXT * (i + 2)}) + "\n" for i in range(3)))
    out = tmp_path / "eval.json"
    args = add_eval_arguments(argparse.ArgumentParser()).parse_args(
        [str(folder), "--teacher", str(teacher_dir), "--data", str(data), "--seq-len", "32", "--max-windows", "3",
         "--position-max", "128", "--segment", "40", "--json", str(out), "--device", "cpu", "--no-baseline"])
    assert eval_main(args) == 0
    q = json.loads(out.read_text())["quality"]["student"]
    if kept == [0, 1]:  # every layer kept: the teacher exactly
        assert q["kl"] < 1e-6 and q["top1"] == 1.0
    lc = tmp_path / "passkey.json"
    args = add_longctx_arguments(argparse.ArgumentParser()).parse_args(
        [str(folder), "--teacher", str(teacher_dir), "--task", "passkey", "--lengths", "160", "--depths", "2",
         "--samples", "2", "--max-new-tokens", "3", "--json", str(lc), "--device", "cpu"])
    assert longctx_main(args) == 0
    models = json.loads(lc.read_text())["models"]
    assert len(models["student"]["records"]) == 4  # 2 depths x 2 samples
    if kept == [0, 1]:
        predictions = {name: [r["prediction"] for r in m["records"]] for name, m in models.items()}
        assert predictions["student"] == predictions["teacher"]
