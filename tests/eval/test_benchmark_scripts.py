"""Benchmark scripts end to end on tiny models: their tables and JSON keep their shape."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_script(name: str = "retrieval_probes"):  # noqa: ANN202 - a module
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_retrieval_probes_runs_with_distance_table(teacher_dir: Path, student_dir: Path, tmp_path: Path,
                                                   capsys) -> None:  # noqa: ANN001 - pytest fixture
    probes = _load_script()
    out = tmp_path / "probes.json"
    assert probes.main(["--teacher", str(teacher_dir), "--students", str(student_dir), "--lengths", "160",
                        "--gaps", "80", "--per-depth", "1", "--by-distance", "160", "--threads", "1",
                        "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["rows"]) == {"teacher", "window baseline", str(student_dir)}
    for row in data["rows"].values():
        assert 0 <= row["key_digits"]["160"] <= 100 and 0 <= row["copy"]["80"] <= 100
        assert len(row["key_digits_by_depth"]) == len(probes.DISTANCE_DEPTHS)
    printed = capsys.readouterr().out
    assert "key digits at 160 tokens by how far back the key is" in printed


def test_decode_speed_reports_a_ratio_per_mixer(teacher_dir: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    speed = _load_script("decode_speed")
    out = tmp_path / "speed.json"
    assert speed.main(["--teacher", str(teacher_dir), "--mixers", "rwkv7,window", "--batch", "2", "--prefill",
                       "24", "--steps", "2", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["rwkv7", "window"]
    assert rows[0]["ratio"] == 1.0 and all(r["tokens_per_s"] > 0 for r in rows)
    assert "| window |" in capsys.readouterr().out
