"""The CLI: conversion-only on every family, generation, planning, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import transformers as tf

from qwerky.cli import main
from qwerky_testing import build_tokenizer, tiny_teacher


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama", "mistral"])
def test_convert_stage0_every_family(family: str, tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    tiny_teacher(family).save_pretrained(teacher)
    build_tokenizer().save_pretrained(teacher)
    assert main(["convert", "--teacher", str(teacher), "--stages", "0", "--out", str(tmp_path / "s")]) == 0
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["model_type"] == "qwerky" and cfg["teacher_config"]["model_type"] == family


def test_generate_streams(teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["convert", "--teacher", str(teacher_dir), "--stages", "0", "--out", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "s"), "--prompt", "The pass key", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("The pass key")


def test_plan_72b_from_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tf.Qwen2Config(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=152064)
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json_string())
    args = ["plan", "--teacher", str(path), "--gpus", "8", "--gpu-mem", "192", "--json", str(tmp_path / "p.json")]
    assert main(args) == 0
    plan = json.loads((tmp_path / "p.json").read_text())
    assert 72e9 < plan["teacher"]["params"] < 74e9
    assert plan["student"]["state_mib_per_sequence"] == 80 * 64 * 128 * 128 * 4 / 2**20
    assert [s["stage"] for s in plan["stages"]] == [1, 2, 3, 4]


def _error(args: list[str]) -> str:
    res = subprocess.run([sys.executable, "-m", "qwerky", *args], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qwerky: error:"), res.stderr[-1500:]
    return lines[0]


def test_bad_inputs_one_line_and_nothing_overwritten(teacher_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n')
    conv = ["convert", "--teacher", str(teacher_dir), "--out", str(out), "--overwrite", "--data", str(data)]

    assert "teacher folder not found" in _error(["convert", "--teacher", str(tmp_path / "nope"), "--out", str(out)])
    gpt2 = tmp_path / "gpt2"
    gpt2_config = tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    tf.GPT2LMHeadModel(gpt2_config).save_pretrained(gpt2)
    assert "unsupported architecture 'gpt2'" in _error(["convert", "--teacher", str(gpt2), "--out", str(out),
                                                        "--stages", "0", "--overwrite"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "empty" in _error([*conv[:-1], str(empty)])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("stage1: [\n")
    assert "malformed YAML" in _error([*conv, "--recipe", str(bad_yaml)])
    assert "unknown recipe field 'stage2.tokns'" in _error([*conv, "--set", "stage2.tokns=5"])
    assert "does not exist" in _error([*conv[:-1], str(tmp_path / "missing.jsonl")])
    assert (out / "precious.txt").read_text() == "keep" and [p.name for p in out.iterdir()] == ["precious.txt"]


def test_existing_output_needs_overwrite(teacher_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("1")
    assert "exists and is not empty" in _error(["convert", "--teacher", str(teacher_dir), "--stages", "0",
                                                "--out", str(out)])


def test_cli_works_without_serving_extras(teacher_dir: Path, tmp_path: Path) -> None:
    """A GPU box with only torch/transformers must still convert: FastAPI is needed by `serve` alone."""
    code = ("import sys; sys.modules['fastapi'] = None\n"
            "from qwerky.cli import main\n"
            f"rc = main(['convert', '--teacher', {str(teacher_dir)!r}, '--out', {str(tmp_path / 's')!r}, "
            "'--stages', '0', '--no-eval'])\n"
            "assert rc == 0, rc\n"
            "sys.exit(main(['serve', 'somewhere']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "qwerky serve needs the Python package 'fastapi'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "s" / "config.json").exists()


@pytest.mark.parametrize("args", [
    ["eval", "{missing}", "--teacher", "{teacher}", "--data", "{teacher}/config.json", "--json", "{tmp}/e.json"],
    ["eval", "{teacher}", "--teacher", "{missing}", "--data", "{teacher}/config.json", "--json", "{tmp}/e.json"],
    ["longctx", "{missing}", "--teacher", "{teacher}", "--task", "passkey", "--json", "{tmp}/l.json"],
    ["serve", "{missing}"],
    ["generate", "{missing}", "--prompt", "hi"],
    ["export", "{missing}", "--format", "gguf", "--out", "{tmp}/x.gguf"],
])
def test_a_missing_model_path_is_named_by_every_command(args: list[str], teacher_dir: Path, tmp_path: Path) -> None:
    """Not a hub error ('Repo id must be in the form ...'): the path is local and it does not exist."""
    filled = [a.format(missing=tmp_path / "no-such-dir", teacher=teacher_dir, tmp=tmp_path) for a in args]
    line = _error(filled)
    assert "not found" in line and "no-such-dir" in line, line


STUDENT_FIXTURE = Path(__file__).parent / "fixtures" / "window-student-2026-11"


@pytest.mark.parametrize("args", [
    ["plan", "--teacher", "{student}", "--cpu", "--cpu-gflops", "1"],
    ["convert", "--teacher", "{student}", "--out", "{tmp}/s", "--stages", "0"],
    ["plan", "--teacher", "{student}/config.json", "--cpu", "--cpu-gflops", "1"],
])
def test_a_student_given_as_teacher_is_named(args: list[str], tmp_path: Path) -> None:
    """A converted folder carries remote code: transformers would ask for trust_remote_code; we say what it is."""
    line = _error([a.format(student=STUDENT_FIXTURE, tmp=tmp_path) for a in args])
    assert "already a converted qwerky model" in line, line
    assert not (tmp_path / "s").exists()
