"""The stage guard (train/guard.py) and the test that distillation learns at all.

A stage that makes the student worse at its own context is reported in the log, the report and the CLI's
summary, and by default undone (the export holds the weights from before it); `train.keep=last` only warns.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import TINY

from qwerky.cli import main
from qwerky.train.guard import GuardTolerance, judge

TOL = GuardTolerance()


@pytest.mark.parametrize("before,after,regressed", [
    ((0.350, 0.616), (0.345, 0.577), True),  # the stage 4: KL 1% better, 4 points of agreement lost
    ((0.100, 0.700), (0.150, 0.700), True),  # KL 50% worse, agreement flat
    ((0.100, 0.700), (0.080, 0.720), False),  # both better
    ((0.100, 0.700), (0.101, 0.698), False),  # within tolerance
    ((0.100, 0.700), (0.080, 0.690), False),  # a trade: KL clearly better, agreement one point worse
])
def test_judge(before: tuple, after: tuple, regressed: bool) -> None:
    v = judge({"kl": before[0], "top1": before[1]}, {"kl": after[0], "top1": after[1]}, TOL)
    assert v["regressed"] is regressed


def _convert(teacher: Path, data: Path, out: Path, *extra: str) -> dict:
    sets = [x for s in TINY for x in ("--set", s)]
    assert main(["convert", "--teacher", str(teacher), "--data", str(data), "--out", str(out), *sets,
                 "--set", "data.eval_windows=8", *extra]) == 0
    return json.loads((out / "report.json").read_text())


def _checkpoint_model(run_dir: Path, tag: str, teacher: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights: what it holds (what was trained), the rest the frozen teacher's."""
    from qwerky.teacher import load_teacher

    model = {k: v.detach() for k, v in load_teacher(teacher).state_dict().items()}
    return {**model, **torch.load(run_dir / "checkpoints" / f"{tag}.pt", weights_only=False)["model"]}


def test_guard_undoes_a_stage_that_makes_the_student_worse(teacher_dir: Path, text_file: Path, tmp_path: Path,
                                                          capsys) -> None:
    out = tmp_path / "s"
    # stage 2 at a learning rate far too high: it wrecks the student, as a bad stage on a real teacher can
    report = _convert(teacher_dir, text_file, out, "--stages", "1,2", "--set", "stage2.lr=3.0",
                      "--set", "stage2.warmup_steps=0", "--set", "stage2.schedule=constant")
    printed = capsys.readouterr()
    entry = report["guard"]["stages"]["stage2"]
    assert entry["regressed"] and entry["action"].startswith("undone")
    assert report["guard"]["kept"] == "stage1" and report["guard"]["stages"]["stage1"]["regressed"] is False
    assert report["quality"] == report["quality_by_stage"]["stage1"]  # the table is the exported model's
    assert "made the student worse" in printed.out and "stage 2" in printed.out
    md = (out / "report.md").read_text()
    assert "**Warning:** stage 2 made the student worse" in md and "the weights after stage1" in md
    exported = load_file(out / "model.safetensors")
    before = _checkpoint_model(tmp_path / "s.run", "stage1-done", teacher_dir)
    wrecked = report["quality_by_stage"]["stage2"]["student"]["kl"]
    assert wrecked > report["quality"]["student"]["kl"]
    for name, t in exported.items():
        assert torch.equal(t, before[name]), name


def test_guard_keep_last_only_warns(teacher_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    report = _convert(teacher_dir, text_file, out, "--stages", "1,2", "--set", "stage2.lr=3.0",
                      "--set", "stage2.warmup_steps=0", "--set", "train.keep=last")
    assert report["guard"]["stages"]["stage2"]["regressed"]
    assert report["guard"]["kept"] == "stage2" and report["quality"] == report["quality_by_stage"]["stage2"]


def test_distillation_learns_and_the_guard_stays_quiet(text_file: Path, tmp_path: Path) -> None:
    """Held-out KL after stage 2 is below stage 0's and top-1 agreement above it; a broken loss sign or a
    frozen student fails this. Nothing regresses, so the guard accepts every stage.

    The embedded teacher (trained, 4 layers): a random tiny teacher's near-uniform predictions are matched
    at stage 0 already. Measured: KL 0.45 -> 0.25, agreement 48% -> 57% in 12k tokens (~15 s); stage 0
    starts lower since its per-head output scales are fitted (train/warm_start.py; before: 1.90 / 11%)."""
    from qwerky.demo import TEACHER

    report = _convert(TEACHER, text_file, tmp_path / "s", "--stages", "1,2",
                      "--set", "stage1.tokens=4096", "--set", "stage2.tokens=8192")
    q0, q2 = report["quality_by_stage"]["stage0"]["student"], report["quality_by_stage"]["stage2"]["student"]
    assert q2["kl"] < 0.7 * q0["kl"], (q0, q2)
    assert q2["top1"] > q0["top1"] + 0.05, (q0, q2)
    assert all(not e["regressed"] and e["action"] == "accepted" for e in report["guard"]["stages"].values())
    assert report["guard"]["kept"] == "stage2"


@pytest.mark.parametrize("losses,effective,degrades", [
    ([5.0, 4.0, 3.8, 3.7], 1024, False),  # keeps improving: at least the measured length
    ([5.0, 4.0, 3.9, 4.4], 512, True),  # rises past 512: a teacher trained at 512 whose config says more
    ([5.0, 4.0, 4.05, 4.06], 1024, False),  # flat within tolerance
])
def test_effective_context_from_loss_by_position(losses: list, effective: int, degrades: bool) -> None:
    from qwerky.eval.quality import position_buckets
    from qwerky.eval.teacher_context import effective_from_buckets

    r = effective_from_buckets(position_buckets(1024, first=128), losses)
    assert (r["effective"], r["degrades"]) == (effective, degrades)


@pytest.mark.parametrize("mode", ["warn", "cap"])
def test_stage_past_the_teachers_context_is_warned_and_capped(teacher_dir: Path, text_file: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """With a teacher whose loss degrades past 64 tokens, stage 4 (128 tokens) is warned about, and with
    train.teacher_context=cap it trains at 64."""
    import qwerky.eval.teacher_context as tc

    real = tc.teacher_effective_context

    def degrading(teacher, windows, **kw):  # the measurement as it is, then a teacher that degrades from 64
        result = real(teacher, windows, **kw)
        return {**result, "effective": 64, "degrades": True, "worst_over_best": 1.3}

    monkeypatch.setattr(tc, "teacher_effective_context", degrading)
    report = _convert(teacher_dir, text_file, tmp_path / "s", "--stages", "1,4",
                      "--set", f"train.teacher_context={mode}")
    context = report["teacher_context"]
    assert context["measured_to"] == 128 and len(context["warnings"]) == 1 and "stage 4" in context["warnings"][0]
    stage4 = next(s for s in report["stages"] if s["stage"] == 4)
    assert stage4["seq_len"] == (64 if mode == "cap" else 128)
    assert "past the teacher's effective context" in (tmp_path / "s" / "report.md").read_text()


def test_decide_keeps_a_worse_stage_1_but_undoes_later_stages_and_non_finite_results() -> None:
    """Stage 1 is a warm start: a worse end-to-end KL after it is reported, not undone (undoing it was
    measured to hurt the final model); stages 2-4 are undone; a non-finite stage 1 is undone too."""
    from qwerky.train.guard import GuardTolerance, decide, judge

    worse = judge({"kl": 2.0, "top1": 0.13}, {"kl": 3.0, "top1": 0.05}, GuardTolerance())
    assert worse["regressed"]
    undo, action = decide(1, worse, "best", can_undo=True)
    assert not undo and "warm start" in action
    assert decide(2, worse, "best", can_undo=True) == (True, "undone")
    assert decide(2, worse, "last", can_undo=True)[0] is False
    assert decide(3, worse, "best", can_undo=False)[0] is False  # resumed mid-way: nothing to go back to
    broken = judge({"kl": 2.0, "top1": 0.13}, {"kl": float("nan"), "top1": 0.0}, GuardTolerance())
    assert decide(1, broken, "best", can_undo=True) == (True, "undone")
    assert judge({"kl": 2.0, "top1": 0.13}, {"kl": float("nan"), "top1": 0.13}, GuardTolerance())["regressed"]
    better = judge({"kl": 2.0, "top1": 0.13}, {"kl": 1.0, "top1": 0.30}, GuardTolerance())
    assert decide(1, better, "best", can_undo=True) == (False, "accepted")
