"""`qwerky sweep`: several mixers at one recipe, one table with the window baseline first, JSON written,
finished conversions reused on a second run."""

from __future__ import annotations

import json
from pathlib import Path

from train_fixtures import TINY

from qwerky.cli import main


def test_sweep_table_json_and_reuse(teacher_dir: Path, text_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    sets = [x for s in TINY for x in ("--set", s)]
    args = ["sweep", "--teacher", str(teacher_dir), "--data", str(text_file), "--out", str(out),
            "--mixers", "rwkv7,window", "--stages", "1,2", *sets, "--seq-len", "64",
            "--decode-context", "96", "--decode-batch", "2", "--decode-steps", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "sweep.json").read_text())
    assert [r["model"] for r in result["rows"]] == ["window baseline (64 + 4 sinks)", "rwkv7", "window", "teacher"]
    rows = {r["model"]: r for r in result["rows"]}
    for name, row in rows.items():
        assert row["kl"] >= 0 and 0 <= row["top1"] <= 1 and row["decode_ratio"] > 0, name
        assert row["state_bytes_per_sequence"] > 0
    assert rows["rwkv7"]["state_bytes_per_sequence"] != rows["teacher"]["state_bytes_per_sequence"]
    assert result["eval"]["seq_len"] == 64 and result["training_tokens"]["rwkv7"] > 0
    assert "| window baseline (64 + 4 sinks) | 0 |" in printed and (out / "sweep.md").exists()
    for mixer in ("rwkv7", "window"):
        assert json.loads((out / mixer / "config.json").read_text())["mixer"] == mixer

    mtime = (out / "rwkv7" / "model.safetensors").stat().st_mtime_ns
    assert main(args) == 0  # the same recipe again: nothing retrained
    assert "finished conversion" in capsys.readouterr().out
    assert (out / "rwkv7" / "model.safetensors").stat().st_mtime_ns == mtime


def test_sweep_rejects_unknown_mixers(tmp_path: Path, capsys) -> None:
    assert main(["sweep", "--out", str(tmp_path / "s"), "--mixers", "rwkv7,mamba9"]) == 2
    assert "unknown mixer 'mamba9'" in capsys.readouterr().err
