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


def test_real_teacher_benchmark_flow_on_a_tiny_teacher(teacher_dir: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """The real-model benchmark end to end with a local teacher (no download): converts, scores every model at
    two lengths beside the window baseline, chat-token agreement through the chat template, writes JSON."""
    from qwerky.demo import HELDOUT_TEXT, TRAIN_TEXT

    script = _load_script("real_teacher")
    out, js = tmp_path / "runs", tmp_path / "rt.json"
    tiny = ["stage1.tokens=512", "stage1.batch_size=4", "stage1.seq_len=64", "stage2.tokens=512",
            "stage2.batch_size=4", "stage2.seq_len=64", "data.eval_seq_len=64", "data.eval_windows=2"]
    sets = [x for s in tiny for x in ("--set", s)]
    assert script.main(["--out", str(out), "--teacher", str(teacher_dir), "--mixers", "rwkv7",
                        "--data", str(TRAIN_TEXT), "--heldout", str(HELDOUT_TEXT), "--windows", "64:2,128:1",
                        "--passkey", "", "--json", str(js), "--recipe", str(ROOT / "benchmarks" / "recipes" /
                                                                          "real_teacher_cpu.yaml"), *sets]) == 0
    result = json.loads(js.read_text())
    assert set(result["quality"]) == {"64", "128"}
    for length in ("64", "128"):
        assert {"window baseline", "rwkv7", "teacher"} <= set(result["quality"][length])
        assert result["quality"][length]["rwkv7"]["kl"] > 0
    assert set(result["chat"]) == {"teacher", "window baseline", "rwkv7"}  # the test tokenizer has a template
    assert all(0 <= c["share"] <= 1 for c in result["chat"].values())
    assert result["bytes_per_sequence_2048"]["rwkv7"] > 0
    assert "| rwkv7 |" in capsys.readouterr().out
