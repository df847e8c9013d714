"""benchmarks/kernel_speed.py end to end on the CPU at tiny sizes: every registered op is timed against SDPA."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from qwerky.opspecs import all_op_specs

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_speed_quick_times_every_op(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("kernel_speed", ROOT / "benchmarks" / "kernel_speed.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "speed.json"
    result = script.main(["--quick", "--device", "cpu", "--lengths", "64", "--repeats", "1", "--naive",
                          "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert not result["failed"]
    methods = {(r["pass"], r["method"]) for r in result["rows"]}
    for op in (s.name for s in all_op_specs()):
        assert {("train", f"{op}_chunk"), ("prefill", f"{op}_chunk"), ("train", f"{op}_naive"),
                ("decode", f"{op}_step")} <= methods
        assert result["skipped"][f"{op}_fla"] == "not on CUDA"
    assert all(r["ratio_to_sdpa"] == 1.0 for r in result["rows"] if r["method"] == "sdpa")
    assert "| decode | 256 | sdpa |" in capsys.readouterr().out
