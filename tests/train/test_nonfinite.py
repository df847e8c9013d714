"""Training that diverges: a NaN/inf step is skipped and counted, a run of them stops the stage with one clear
line, the log stays strict JSON, and nothing non-finite is ever exported, whatever --no-eval or keep say."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from train_fixtures import TINY

from qwerky.cli import main
from qwerky.surgery import convert_teacher, save_student
from qwerky.surgery.export import NonFiniteWeights
from qwerky.train.loop import JsonlLog
from qwerky_testing import tiny_teacher


def _strict(line: str) -> dict:
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def test_a_diverging_stage_stops_with_a_clear_error_and_nothing_is_exported(
        teacher_dir: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "s"
    sets = [x for s in TINY for x in ("--set", s)]
    rc = main(["convert", "--teacher", str(teacher_dir), "--data", str(text_file), "--out", str(out), *sets,
               "--stages", "1,2", "--no-eval", "--set", "train.keep=last", "--set", "stage2.lr=1e8"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "NaN/inf" in err and "stage2.lr" in err, err[-2000:]
    assert not out.exists()
    log = [_strict(line) for line in (tmp_path / "s.run" / "log.jsonl").read_text().splitlines()]
    skipped = [r for r in log if r.get("skipped")]
    assert skipped and all(r["stage"] == 2 and r["loss"] is None for r in skipped)


def test_export_refuses_non_finite_weights(tmp_path: Path) -> None:
    student = convert_teacher(tiny_teacher("qwen2"), mixer="rwkv7")
    with torch.no_grad():
        student.mixers[0].decay_base[3] = float("nan")
    with pytest.raises(NonFiniteWeights, match="NaN/inf"):
        save_student(student, None, tmp_path / "s")
    assert not (tmp_path / "s").exists() and not list(tmp_path.iterdir())


def test_the_log_writes_nan_as_null(tmp_path: Path) -> None:
    log = JsonlLog(tmp_path / "log.jsonl", enabled=True)
    log.write({"stage": 2, "step": 1, "tokens": 8, "loss": math.nan, "lr": 1e-3, "x": [math.inf, 1.0]})
    rec = _strict((tmp_path / "log.jsonl").read_text())
    assert rec["loss"] is None and rec["x"] == [None, 1.0]
