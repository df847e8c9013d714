"""The conversion's phases one at a time (train/pipeline.py: `Conversion`), on the tiny teacher.

The end-to-end runs (test_pipeline, test_guard, test_hybrid, test_nonfinite) show the phases together; these
show what each phase itself owes: the token cache built once, the student owning exactly what it trains, one
checkpoint format, the guard's undo, the export and report, the hybrid's strict key map, notices for the CLI.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from train_fixtures import TINY

import qwerky.train.pipeline as pipeline
from qwerky.eval.report import render_report_md
from qwerky.surgery import convert_teacher
from qwerky.train import ConvertJob, load_recipe
from qwerky.train.hybrid import hybrid_key_map
from qwerky.train.parallel import DistInfo, apply_activation_checkpointing, main_first
from qwerky.train.pipeline import Conversion, RunState
from qwerky.train.stages import recurrent_mixers
from qwerky_testing import tiny_teacher


def _conversion(teacher_dir: Path, text_file: Path, tmp_path: Path, stages: list[int], *sets: str,
                evaluate: bool = True) -> Conversion:
    recipe = load_recipe("default", [*TINY, *sets])
    job = ConvertJob(teacher=teacher_dir, out=tmp_path / "out", recipe=recipe, data=[text_file], stages=stages,
                     evaluate=evaluate)
    pipeline.validate_job(job)
    return Conversion(job, DistInfo())


def _shared(student: torch.nn.Module, teacher: torch.nn.Module) -> set[str]:
    """Names of the student's parameters that are the teacher's own tensors."""
    ptrs = {p.data_ptr() for p in teacher.parameters()}
    return {n for n, p in student.named_parameters() if p.data_ptr() in ptrs}


def test_prepare_builds_the_token_cache_once_and_the_student_owns_only_its_mixers(
        teacher_dir: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = pipeline.build_token_cache
    monkeypatch.setattr(pipeline, "build_token_cache", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    conv = _conversion(teacher_dir, text_file, tmp_path, [1, 2])
    conv.prepare()
    assert len(calls) == 1
    shared = _shared(conv.student, conv.teacher)
    mixer_names = {f"model.layers.{m.layer_idx}.self_attn." for m in conv.student.mixers}
    assert shared and not any(n.startswith(tuple(mixer_names)) for n in shared)  # MLPs shared, mixers own
    assert conv.owns == "mixers" and not conv.state.unshared_all
    assert set(conv.state.evals) == {"stage0"} and conv.windows is not None


def test_unshare_is_decided_in_one_place_and_stage_3_owns_everything(teacher_dir: Path, text_file: Path,
                                                                     tmp_path: Path) -> None:
    conv = _conversion(teacher_dir, text_file, tmp_path, [1, 2, 3], "stage3.lora_rank=4", evaluate=False)
    conv.prepare()
    params = conv.make_trainable(2, conv.recipe.stage(2))
    ids = {id(p) for m in recurrent_mixers(conv.student) for p in m.parameters()}
    assert params and {id(p) for p in params} == ids  # stage 2: the mixers, nothing else
    params = conv.make_trainable(3, conv.recipe.stage(3))
    assert not _shared(conv.student, conv.teacher) and conv.state.unshared_all
    lora = [n for n, p in conv.student.named_parameters() if "lora_" in n and p.requires_grad]
    assert lora and conv.state.lora == 4
    assert not any(p.requires_grad for n, p in conv.student.named_parameters() if "mlp" in n and "lora_" not in n)


def test_one_checkpoint_format_round_trips(teacher_dir: Path, text_file: Path, tmp_path: Path) -> None:
    conv = _conversion(teacher_dir, text_file, tmp_path, [1], evaluate=False)
    conv.prepare()
    conv.state.summaries.append({"stage": 1})
    conv.state.kept = "stage1"
    conv.checkpoint(2, None, tag="stage1-done")
    payload = conv.ckpt.load_latest()
    assert payload is not None and payload["stage"] == 2 and payload["stage_state"] is None
    assert payload["recipe"] == conv.recipe.to_dict()
    assert RunState.from_payload(payload) == conv.state
    for key, value in conv.student.state_dict().items():
        if key in payload["model"]:
            assert torch.equal(payload["model"][key], value), key


def test_a_checkpoint_holds_what_was_trained_and_resumes_to_the_same_weights(
        teacher_dir: Path, text_file: Path, tmp_path: Path) -> None:
    """Stages 1-2 train the mixers: their checkpoints hold the mixers (and their optimiser state), not the frozen
    teacher's embeddings and MLPs, and a resumed run rebuilds exactly the same student from one. From stage 3 on
    every weight trains, so every weight is written."""
    conv = _conversion(teacher_dir, text_file, tmp_path, [1, 3], evaluate=False)
    conv.prepare()
    spec = conv.recipe.stage(1)
    conv.state.summaries.append(conv.train(1, spec, conv.make_trainable(1, spec)))
    conv.checkpoint(3, None, tag="stage1-done")
    stored = set(conv.ckpt.load_latest()["model"])
    mixer_keys = {k for k in conv.student.state_dict() if ".self_attn." in k}
    assert stored == mixer_keys  # embeddings, norms, MLPs and head are the teacher's: not written
    resumed = Conversion(ConvertJob(**{**vars(conv.job), "resume": True}), DistInfo())
    resumed.prepare()
    assert resumed.state == conv.state
    full = resumed.student.state_dict()
    assert set(full) == set(conv.student.state_dict())
    for key, value in conv.student.state_dict().items():
        assert torch.equal(full[key], value), key
    conv.make_trainable(3, conv.recipe.stage(3))
    assert conv.stored_keys() == set(conv.student.state_dict())


def test_guard_undoes_a_stage_that_made_the_student_worse(teacher_dir: Path, text_file: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    conv = _conversion(teacher_dir, text_file, tmp_path, [1, 2])
    conv.prepare()
    before = {k: v.clone() for k, v in conv.student.state_dict().items()}
    guard = conv.guard_before(2, conv.recipe.stage(2), mid_stage=False)
    assert guard is not None and guard.saved is not None
    with torch.no_grad():  # what a diverging stage does to the weights
        for m in recurrent_mixers(conv.student):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 3)
    conv.evaluate(2)
    conv.state.kept = "stage2"
    with caplog.at_level(logging.WARNING, logger=pipeline.NOTICE_LOGGER):
        conv.guard_stage(2, guard)
    entry = conv.state.guard["stage2"]
    assert entry["regressed"] and entry["action"].startswith("undone") and conv.state.kept == "stage0"
    assert "warning: stage 2 made the student worse" in caplog.text  # a notice: the CLI prints it
    for key, value in conv.student.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_train_runs_one_stage_and_logs_its_steps(teacher_dir: Path, text_file: Path, tmp_path: Path) -> None:
    conv = _conversion(teacher_dir, text_file, tmp_path, [1], evaluate=False)
    conv.prepare()
    spec = conv.recipe.stage(1)
    start = {n: p.detach().clone() for n, p in conv.student.named_parameters()}
    summary = conv.train(1, spec, conv.make_trainable(1, spec))
    steps = spec.tokens // (spec.batch_size * spec.seq_len)
    assert summary["stage"] == 1 and summary["steps"] == steps and summary["seq_len"] == spec.seq_len
    log = [json.loads(x) for x in (conv.run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    moved = {n for n, p in conv.student.named_parameters() if not torch.equal(p, start[n])}
    assert moved and all(".self_attn." in n for n in moved)  # stage 1 trains the mixers only


def test_finish_exports_the_student_with_its_report(teacher_dir: Path, text_file: Path, tmp_path: Path) -> None:
    conv = _conversion(teacher_dir, text_file, tmp_path, [0])
    conv.prepare()
    report = conv.finish()
    out = conv.job.out
    assert json.loads((out / "report.json").read_text())["quality"] == report["quality"] == conv.state.evals["stage0"]
    assert (out / "report.md").read_text() == render_report_md(report)
    assert (conv.run_dir / "report.md").read_text() == render_report_md(report)
    assert (out / "model.safetensors").is_file()


def test_hybrid_key_map_maps_every_trained_weight_and_refuses_a_dropped_one() -> None:
    teacher = tiny_teacher("qwen2")
    old = convert_teacher(teacher, mixer="rwkv7")
    new = convert_teacher(teacher, mixer="rwkv7", attention_layers=[0])
    key_map = hybrid_key_map(old, new, [0])
    assert key_map and all(".layers.0." not in k for k in key_map)
    # layer 1 is now the first converted layer (the value-residual source): its value mix goes on purpose
    assert not any(".layers.1." in k and "value_mix" in k for k in key_map)
    assert "model.layers.1.self_attn.receptance.weight" in key_map
    del new.model.layers[1].self_attn.receptance  # a student that has no place for a trained weight
    with pytest.raises(RuntimeError, match="without a place.*layers.1.self_attn.receptance"):
        hybrid_key_map(old, new, [0])


def test_activation_checkpointing_is_switched_by_one_function() -> None:
    student = convert_teacher(tiny_teacher("qwen2"), mixer="rwkv7")
    apply_activation_checkpointing(student.model, True)
    assert student.model.is_activation_checkpointing
    apply_activation_checkpointing(student.model, False)
    assert not student.model.is_activation_checkpointing
    apply_activation_checkpointing(student.model, False)  # idempotent


def test_main_first_runs_once_per_process() -> None:
    calls = []
    assert main_first(DistInfo(), lambda: calls.append(1) or "x") == "x" and calls == [1]


def test_report_md_shows_the_quality_table_and_the_kept_stage() -> None:
    q = {"teacher": {"ppl": 10.0}, "student": {"ppl": 12.0, "kl": 0.1, "top1": 0.5}}
    md = render_report_md({"teacher": "T", "out": "S", "wall_s": 1.0, "quality": q,
                           "stages": [{"stage": 2, "name": "x", "tokens": 8, "seq_len": 4, "wall_s": 1,
                                       "tokens_per_s": 8, "final_loss": 0.5}],
                           "guard": {"kept": "stage1", "keep": "best"}})
    assert "| student | 12.000 | 1.200 | 0.1000 | 50.0% |" in md
    assert "Exported: the weights after stage1 (train.keep=best)" in md
