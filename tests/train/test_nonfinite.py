"""Training that diverges: a NaN/inf step is skipped and counted, a run of them stops the stage with one clear
line, the log stays strict JSON, and nothing non-finite is ever exported, whatever --no-eval or keep say."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
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
    assert "starts it again from checkpoint stage1-done" in err  # rolled back to the last good checkpoint
    manifest = json.loads((tmp_path / "s.run" / "checkpoints" / "manifest.json").read_text())["checkpoints"]
    assert manifest[-1]["tag"] == "stage1-done" and not any(e["tag"].startswith("stage2") for e in manifest)
    # the run resumes there with a lower stage 2 learning rate, and what it exports is finite
    assert main(["convert", "--teacher", str(teacher_dir), "--data", str(text_file), "--out", str(out), *sets,
                 "--stages", "1,2", "--no-eval", "--set", "train.keep=last", "--set", "stage2.lr=1e-3",
                 "--resume"]) == 0
    assert "resumed at stage 2 step 0 from checkpoint stage1-done" in capsys.readouterr().out
    weights = load_file(out / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    log = [_strict(line) for line in (tmp_path / "s.run" / "log.jsonl").read_text().splitlines()]
    assert not any(r.get("skipped") for r in log)  # the diverged steps were superseded by the resumed ones
    assert [r["step"] for r in log if r["stage"] == 2 and "event" not in r] == [1, 2, 3, 4]


def test_a_changed_recipe_is_refused_on_resume_except_for_stages_not_begun(
        teacher_dir: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "s"
    base = ["convert", "--teacher", str(teacher_dir), "--data", str(text_file), "--out", str(out),
            *[x for s in TINY for x in ("--set", s)], "--stages", "1,2", "--no-eval"]
    assert main([*base, "--set", "stage2.enabled=false"]) == 0  # checkpoints end at stage 2, not begun
    assert main([*base, "--set", "stage2.enabled=false", "--set", "stage1.lr=0.5", "--resume"]) == 2
    assert "differs from the checkpointed run's in stage1" in capsys.readouterr().err


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
