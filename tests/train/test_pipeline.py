"""The main job end to end on a tiny teacher: all stages, report, export; resume after SIGKILL; bad inputs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import TINY

from qwerky.cli import main
from qwerky.train.checkpoint import CheckpointManager


def _args(teacher: Path, data: Path, out: Path, extra: list[str] | None = None) -> list[str]:
    sets = [x for s in TINY for x in ("--set", s)]
    return ["convert", "--teacher", str(teacher), "--data", str(data), "--out", str(out), *sets, *(extra or [])]


def test_all_stages_report_and_export(teacher_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "student"
    assert main(_args(teacher_dir, text_file, out, ["--set", "stage3.lora_rank=4"])) == 0
    report = json.loads((out / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == [1, 2, 3, 4]
    _assert_report_measures_the_export(report, teacher_dir, text_file, out)
    assert set(report["quality_by_stage"]) == {"stage0", "stage1", "stage2", "stage3", "stage4"}
    assert "| window baseline" in (out / "report.md").read_text()
    weights = load_file(out / "model.safetensors")
    assert not any("lora_A" in k or "lora_B" in k or "base_layer" in k for k in weights)  # merged before export
    assert "model.layers.0.mlp.up_proj.weight" in weights
    log = [json.loads(line) for line in (tmp_path / "student.run" / "log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {1, 2, 3, 4} and all("loss" in r and "tokens" in r for r in log)


def test_stages_train_only_what_they_should(teacher_dir: Path, text_file: Path, tmp_path: Path) -> None:
    from qwerky.teacher import load_teacher

    teacher = load_teacher(teacher_dir)
    out = tmp_path / "s"
    assert main(_args(teacher_dir, text_file, out, ["--stages", "1,2", "--no-eval"])) == 0
    weights = load_file(out / "model.safetensors")
    mlp = weights["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(mlp, teacher.model.layers[0].mlp.up_proj.weight)  # stages 1-2 leave MLPs alone
    assert not torch.equal(weights["model.layers.0.self_attn.receptance.weight"],
                           teacher.model.layers[0].self_attn.q_proj.weight)


def test_window_student_with_recall_rows(teacher_dir: Path, text_file: Path, tmp_path: Path) -> None:
    """The window student's recipe defaults reach the exported model: keys centred on the training text
    (a non-zero offset per layer), no RoPE on the branch, slow decays; recall rows train without error."""
    out = tmp_path / "w"
    extra = ["--mixer", "window", "--stages", "1,2", "--no-eval",
             "--set", "data.recall_fraction=0.5", "--set", "data.recall_min_gap=16"]
    assert main(_args(teacher_dir, text_file, out, extra)) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["mixer_options"] == {"window_size": 64, "num_sinks": 4, "branch_rope": False,
                                       "branch_decay_init": [-9.0, -3.0], "branch_center_keys": True}
    weights = load_file(out / "model.safetensors")
    offsets = [v for k, v in weights.items() if k.endswith("key_offset")]
    assert len(offsets) == config["num_hidden_layers"] and all(o.abs().sum() > 0 for o in offsets)


def _run_cli(args: list[str], **kw: object) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "qwerky", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


def _kill_at_checkpoint(run: subprocess.Popen, run_dir: Path, tag: str) -> None:
    """SIGKILL `run` as soon as a checkpoint whose tag contains `tag` is in its manifest."""
    manifest = run_dir / "checkpoints" / "manifest.json"
    deadline = time.time() + 240
    while time.time() < deadline and run.poll() is None:
        if manifest.exists() and tag in manifest.read_text():
            run.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    run.wait()
    assert run.returncode == -signal.SIGKILL, "the run finished before it could be killed mid-stage"


def test_resume_after_sigkill_equals_uninterrupted(teacher_dir: Path, text_file: Path, tmp_path: Path) -> None:
    extra = ["--stages", "1,2", "--no-eval", "--set", "train.checkpoint_every=3", "--set", "stage2.tokens=16384"]
    ref = _run_cli(_args(teacher_dir, text_file, tmp_path / "ref", extra))
    _kill_at_checkpoint(_run_cli(_args(teacher_dir, text_file, tmp_path / "run", extra)), tmp_path / "run.run",
                        "stage2-step")
    assert not (tmp_path / "run").exists()
    resumed = _run_cli(_args(teacher_dir, text_file, tmp_path / "run", [*extra, "--resume"]))
    assert resumed.wait() == 0, resumed.stderr.read()
    assert ref.wait() == 0, ref.stderr.read()
    a = load_file(tmp_path / "ref" / "model.safetensors")
    b = load_file(tmp_path / "run" / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    log = [json.loads(x) for x in (tmp_path / "run.run" / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if r["stage"] == 2 and "event" not in r]
    assert steps == list(range(1, len(steps) + 1))  # the log was cut back to the checkpoint, no duplicates
    (resumed_at,) = [r for r in log if r.get("event") == "resumed"]
    assert resumed_at["stage"] == 2 and resumed_at["step"] % 3 == 0 and resumed_at["checkpoint"].startswith("stage2")
    assert "resumed at stage 2 step" in resumed_at["message"]


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save({"step": 1}, "a")
    mgr.save({"step": 2}, "b")
    path = tmp_path / "b.pt"
    path.write_bytes(path.read_bytes()[:20])  # a partial write
    assert mgr.load_latest() == {"step": 1}
    assert "corrupt or partial" in caplog.text
    (tmp_path / "a.pt").unlink()
    assert mgr.load_latest() is None


def test_checkpoint_rotation_keeps_the_newest_stage_boundary(tmp_path: Path) -> None:
    """Mid-stage checkpoints rotate (keep 2), the newest pinned one (a stage start) stays: a stage that diverges
    can be dropped and started again from it."""
    mgr = CheckpointManager(tmp_path, keep=2)
    mgr.save({"n": 0}, "stage1-done", pin=True)
    for step in (3, 6, 9):
        mgr.save({"n": step}, f"stage2-step{step:08d}")
    assert [e["tag"] for e in json.loads(mgr.manifest_path.read_text())["checkpoints"]] == [
        "stage1-done", "stage2-step00000006", "stage2-step00000009"]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["stage1-done.pt", "stage2-step00000006.pt",
                                                             "stage2-step00000009.pt"]
    assert mgr.drop(lambda tag: tag.startswith("stage2-step")) == ["stage2-step00000006", "stage2-step00000009"]
    assert mgr.load_latest() == {"n": 0} and mgr.loaded_tag == "stage1-done"
    assert [p.name for p in tmp_path.glob("*.pt")] == ["stage1-done.pt"]


def test_resume_drops_what_the_killed_run_logged_after_its_checkpoint(tmp_path: Path) -> None:
    from qwerky.train.loop import JsonlLog

    path = tmp_path / "log.jsonl"
    lines = [json.dumps({"stage": st, "step": sp, "loss": 1.0, "step_s": 0.5}) for st, sp in
             [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3)]]
    path.write_text("\n".join(lines) + '\n{"stage": 2, "st')  # the kill cut the last line
    record = JsonlLog(path, True).resume_at(2, 1, {"event": "resumed", "stage": 2, "step": 1})
    assert record["dropped_records"] == 2 and record["redone_s"] == 1.0
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in records] == [(1, 1), (1, 2), (2, 1), (2, 1)]
    assert records[-1]["event"] == "resumed"


def test_resume_without_a_checkpoint_starts_afresh(teacher_dir: Path, text_file: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """What scripted retries need: a run killed before its first checkpoint, rerun with --resume, starts from the
    beginning with a notice; the killed run's log lines are superseded, not duplicated."""
    out, run_dir = tmp_path / "s", tmp_path / "s.run"
    run_dir.mkdir()
    (run_dir / "log.jsonl").write_text(json.dumps({"stage": 1, "step": 1, "loss": 1.0}) + "\n")
    assert main(_args(teacher_dir, text_file, out, ["--stages", "1", "--no-eval", "--resume"])) == 0
    assert "no checkpoint in" in capsys.readouterr().out
    records = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "resumed" and records[0]["dropped_records"] == 1
    assert [r["step"] for r in records[1:]] == [1, 2, 3, 4]


def _torchrun(teacher: Path, data: Path, out: Path, extra: list[str], procs: int, port: int,
              **env: str) -> None:
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                          "--master_port", str(port), "-m", "qwerky", *_args(teacher, data, out, extra)],
                         env=dict(os.environ, OMP_NUM_THREADS="1", **env), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def _assert_same_training(a_dir: Path, b_dir: Path) -> None:
    """The same steps with the same losses (rel 1e-4), and the same exported weights (1e-4)."""
    la = [json.loads(x) for x in a_dir.with_suffix(".run").joinpath("log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in b_dir.with_suffix(".run").joinpath("log.jsonl").read_text().splitlines()]
    la, lb = ([r for r in records if "event" not in r] for records in (la, lb))  # step records (not "resumed")
    assert [(r["stage"], r["step"]) for r in la] == [(r["stage"], r["step"]) for r in lb]
    for ra, rb in zip(la, lb):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4), (ra, rb)
    a = load_file(a_dir / "model.safetensors")
    b = load_file(b_dir / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_fsdp_two_processes_match_one(teacher_dir: Path, text_file: Path, tmp_path: Path) -> None:
    extra = ["--stages", "1,2,3", "--no-eval"]
    one = _run_cli(_args(teacher_dir, text_file, tmp_path / "one", extra))
    assert one.wait() == 0, one.stderr.read()
    _torchrun(teacher_dir, text_file, tmp_path / "two", extra, procs=2, port=29533)
    _assert_same_training(tmp_path / "one", tmp_path / "two")
    # resumed under FSDP2 from stage 2's end, a checkpoint holding the mixers only: stage 3 again, same result
    mgr = CheckpointManager(tmp_path / "two.run" / "checkpoints")
    assert mgr.drop(lambda tag: tag == "stage3-done") == ["stage3-done"]
    held = mgr.load_latest()["model"]
    assert mgr.loaded_tag == "stage2-done" and held and all(".self_attn." in k for k in held)
    _torchrun(teacher_dir, text_file, tmp_path / "two", [*extra, "--resume"], procs=2, port=29536)
    _assert_same_training(tmp_path / "one", tmp_path / "two")


def test_fsdp_two_processes_evaluate_and_guard_like_one(teacher_dir: Path, text_file: Path, tmp_path: Path) -> None:
    """Held-out evaluation and the stage guard under torchrun: every rank evaluates (the sharded forward needs
    them all), the numbers equal one process's, and a stage that wrecks the student is undone on every rank,
    so the exported model is stage 1's, as with one process."""
    extra = ["--stages", "1,2", "--set", "data.eval_windows=4", "--set", "stage2.lr=3.0",
             "--set", "stage2.warmup_steps=0", "--set", "stage2.schedule=constant"]
    one = _run_cli(_args(teacher_dir, text_file, tmp_path / "one", extra))
    assert one.wait() == 0, one.stderr.read()
    _torchrun(teacher_dir, text_file, tmp_path / "two", extra, procs=2, port=29535)
    ra = json.loads((tmp_path / "one" / "report.json").read_text())
    rb = json.loads((tmp_path / "two" / "report.json").read_text())
    assert rb["parallel"]["world_size"] == 2
    assert rb["guard"]["kept"] == ra["guard"]["kept"] == "stage1"
    assert rb["guard"]["stages"]["stage2"]["regressed"] and rb["guard"]["stages"]["stage2"]["action"].startswith(
        "undone")
    # stage 2 at lr 3.0 is chaotic (last-bit differences of the two-rank reduction grow), so compare before it
    for stage in ("stage0", "stage1"):
        a, b = ra["quality_by_stage"][stage]["student"], rb["quality_by_stage"][stage]["student"]
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-3) and b["top1"] == pytest.approx(a["top1"], abs=1e-3)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_forced_fsdp_on_one_process_matches_plain_run(teacher_dir: Path, text_file: Path, tmp_path: Path) -> None:
    """QWERKY_FSDP=1 (how a single-GPU machine checks the sharded path) trains exactly like the plain run,
    with activation checkpointing on (as on CUDA, where FSDP2 and checkpointing collided on torch 2.11)."""
    extra = ["--no-eval", "--set", "train.activation_checkpointing=on"]
    one = _run_cli(_args(teacher_dir, text_file, tmp_path / "one", extra))
    assert one.wait() == 0, one.stderr.read()
    _torchrun(teacher_dir, text_file, tmp_path / "fsdp", extra, procs=1, port=29534, QWERKY_FSDP="1")
    parallel = json.loads((tmp_path / "fsdp" / "report.json").read_text())["parallel"]
    assert parallel == {"fsdp2": True, "world_size": 1, "forced": True, "device": "cpu"}
    assert json.loads((tmp_path / "one" / "report.json").read_text())["parallel"]["fsdp2"] is False
    _assert_same_training(tmp_path / "one", tmp_path / "fsdp")


def test_a_kill_inside_stage_1_resumes_from_a_time_checkpoint(teacher_dir: Path, text_file: Path,
                                                               tmp_path: Path) -> None:
    """No step-count checkpoint is ever due (checkpoint_every 1000); checkpoints by time (here: every step)
    still let a run killed inside stage 1 resume to the uninterrupted run's weights."""
    extra = ["--stages", "1", "--no-eval", "--set", "train.checkpoint_every=1000",
             "--set", "train.checkpoint_minutes=1e-9", "--set", "stage1.tokens=8192"]
    ref = _run_cli(_args(teacher_dir, text_file, tmp_path / "ref", extra))
    _kill_at_checkpoint(_run_cli(_args(teacher_dir, text_file, tmp_path / "run", extra)), tmp_path / "run.run",
                        "stage1-step00000004")
    resumed = _run_cli(_args(teacher_dir, text_file, tmp_path / "run", [*extra, "--resume"]))
    assert resumed.wait() == 0, resumed.stderr.read()
    assert ref.wait() == 0, ref.stderr.read()
    a = load_file(tmp_path / "ref" / "model.safetensors")
    b = load_file(tmp_path / "run" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k


def _steps_logged(log: Path) -> int:
    """Step records in a run's log now (a resume drops the killed run's records after its checkpoint)."""
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for x in lines if '"step"' in x and '"event"' not in x)


def test_a_run_killed_at_random_points_resumes_to_the_uninterrupted_weights(
        teacher_dir: Path, text_file: Path, tmp_path: Path) -> None:
    """Fault injection (issue 24): one conversion SIGKILLed six times - once at a random moment of its start-up,
    then at random training steps (the first inside stage 1, where no step-count checkpoint is ever due) - and
    resumed with --resume after each kill ends with the uninterrupted run's weights (<= 1e-6). Each resume's
    log record says how much step work the kill cost; it is bounded by the checkpoint period and one step."""
    minutes = 0.005  # a time checkpoint every 0.3 s; train.checkpoint_every never comes due
    extra = ["--stages", "1,2,3", "--no-eval", "--set", "train.checkpoint_every=1000",
             "--set", f"train.checkpoint_minutes={minutes}", "--set", "stage1.tokens=8192",
             "--set", "stage2.tokens=8192", "--set", "stage3.tokens=4096"]
    s1, s2, s3 = (tokens // (4 * 64) for tokens in (8192, 8192, 4096))  # steps (batch 4 x 64 tokens, TINY)
    total = s1 + s2 + s3
    rng = random.Random(24)  # kill steps: two in stage 1 (the first early), two in stage 2, one in stage 3
    targets = [rng.randint(2, 8), rng.randint(10, s1 - 2), *sorted(rng.sample(range(s1 + 2, s1 + s2 - 1), 2)),
               rng.randint(s1 + s2 + 2, total - 2)]
    ref = _run_cli(_args(teacher_dir, text_file, tmp_path / "ref", extra))
    out, run_dir = tmp_path / "run", tmp_path / "run.run"
    log, manifest = run_dir / "log.jsonl", run_dir / "checkpoints" / "manifest.json"
    kills = []
    for i, target in enumerate([None, *targets]):
        started = time.time()
        run = _run_cli(_args(teacher_dir, text_file, out, [*extra, *(["--resume"] if i else [])]))
        deadline = time.time() + (rng.uniform(0.5, 4.0) if target is None else 240)
        while run.poll() is None and time.time() < deadline and (target is None or _steps_logged(log) < target):
            time.sleep(0.005)
        run.send_signal(signal.SIGKILL)
        killed = time.time()
        run.wait()
        assert run.returncode == -signal.SIGKILL, f"kill {i}: the run ended first: {run.stderr.read()[-2000:]}"
        newest = json.loads(manifest.read_text())["checkpoints"][-1]["file"] if manifest.exists() else None
        saved = (run_dir / "checkpoints" / newest).stat().st_mtime if newest else None
        # the killed process's work that is lost: since its newest checkpoint, or since it started (start-up too)
        kills.append({"at_step": _steps_logged(log), "target": target, "newest_checkpoint": newest,
                      "lost_wall_s": round(killed - max(saved or started, started), 2)})
    final = _run_cli(_args(teacher_dir, text_file, out, [*extra, "--resume"]))
    assert final.wait() == 0, final.stderr.read()[-3000:]
    assert ref.wait() == 0, ref.stderr.read()[-3000:]
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(a) == set(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    records = [json.loads(x) for x in log.read_text().splitlines()]
    steps = [(r["stage"], r["step"]) for r in records if "event" not in r]
    assert steps == sorted(set(steps)) and len(steps) == total  # every step logged once, in order
    resumes = [r for r in records if r.get("event") == "resumed"]
    assert len(resumes) == len(kills)
    step_s = max(r["step_s"] for r in records if "event" not in r)
    for r in resumes:
        assert r["redone_s"] <= 60 * minutes + 2 * step_s, r
    for k, r in zip(kills, resumes):
        k.update(resumed_at=(r["stage"], r["step"]), redone_steps=r["dropped_records"], redone_s=r["redone_s"])
    print("\nkill | killed after step | resumed at (stage, step) from | steps redone | step seconds redone | "
          "wall seconds lost (since the process's newest checkpoint or its start)")
    for i, k in enumerate(kills):
        print(f"{i} | {k['at_step']} | {k['resumed_at']} {k['newest_checkpoint']} | {k['redone_steps']} | "
              f"{k['redone_s']} | {k['lost_wall_s']}")


def _assert_report_measures_the_export(report: dict, teacher_dir: Path, text_file: Path, out: Path) -> None:
    """The report's quality table is that of the exported weights: the same held-out windows, re-measured on the
    folder as a user loads it, give the same KL, top-1 and perplexities; and the student beats its stage 0."""
    from qwerky.data import build_token_cache, heldout_windows
    from qwerky.eval.quality import compare_models
    from qwerky.surgery import load_student
    from qwerky.teacher import load_teacher, load_tokenizer
    from qwerky.train.recipe import load_recipe

    recipe = load_recipe("default", list(TINY))
    run_dir = out.with_name(out.name + ".run")
    cache = build_token_cache([text_file], load_tokenizer(teacher_dir), run_dir / "token-cache",
                              heldout_fraction=recipe.data.heldout_fraction, seed=recipe.data.seed,
                              text_field=recipe.data.text_field)
    windows = heldout_windows(cache.heldout, recipe.data.eval_seq_len, recipe.data.eval_windows)
    assert windows.shape[0] == report["data"]["eval_windows"]
    with torch.no_grad():
        again = compare_models(load_teacher(teacher_dir), load_student(out), windows, progress=False)
    q = report["quality"]
    for name in ("teacher", "student"):
        assert again[name]["ppl"] == pytest.approx(q[name]["ppl"], rel=1e-4), name
    assert again["student"]["kl"] == pytest.approx(q["student"]["kl"], rel=1e-3, abs=1e-5)
    assert again["student"]["top1"] == pytest.approx(q["student"]["top1"], abs=1e-6)
    assert q["student"]["kl"] < report["quality_by_stage"]["stage0"]["student"]["kl"]

