"""The main job: teacher folder + text -> converted student folder + quality report.

Order: validate every input (nothing is written before that), tokenise the data once (cached), stage 0
surgery, the enabled stages with checkpoints, held-out evaluation against the teacher and the
training-free window baseline, export, report.json + report.md. `resume=True` continues from the newest
good checkpoint in the run directory: same weights, optimiser, schedule, data position and RNG.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwerky.data import DataError, PackedBatches, RecallRows, build_token_cache, heldout_windows
from qwerky.data.sources import resolve_sources
from qwerky.plan import stage_needs_checkpointing
from qwerky.surgery import calibrate_mixers, convert_teacher, save_student, unshare_from_teacher
from qwerky.teacher import QwerkyError, check_model_dir, load_teacher, load_tokenizer

from .checkpoint import CheckpointManager, atomic_write_bytes, atomic_write_json
from .flops import FlopModel
from .guard import GuardTolerance, decide, describe, judge
from .hybrid import parse_keep_attention
from .loop import JsonlLog, choose_threads, run_stage
from .parallel import (
    DistInfo,
    barrier,
    cleanup,
    from_rank0,
    fsdp_recomputes_chunked_head,
    init_distributed,
    reshard,
    shard_student,
    shard_teacher,
)
from .recipe import Recipe
from .stages import (
    STAGE_NAMES,
    TeacherTaps,
    add_mlp_lora,
    make_step_fn,
    merge_lora,
    trainable_parameters,
)
from .warm_start import fit_output_scales

log = logging.getLogger(__name__)


@dataclass
class ConvertJob:
    teacher: Path
    out: Path
    recipe: Recipe
    data: list[Path] = field(default_factory=list)
    heldout: list[Path] = field(default_factory=list)
    stages: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    run_dir: Path | None = None
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    cache_dir: Path | None = None
    evaluate: bool = True

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir) if self.run_dir else self.out.with_name(self.out.name + ".run")


def validate_job(job: ConvertJob) -> None:
    """Every check that can fail on user input, before anything is written."""
    check_model_dir(job.teacher)
    bad = [s for s in job.stages if s not in (0, 1, 2, 3, 4)]
    if bad:
        raise QwerkyError(f"--stages accepts 0 (conversion only) and 1,2,3,4; got {bad}")
    training = [s for s in job.stages if s > 0]
    if training and not job.data:
        raise QwerkyError("training stages need text: pass --data FILE... (.txt, .jsonl, .jsonl.gz, .parquet, "
                          "or a saved datasets folder), or --stages 0 for conversion only")
    sources = (resolve_sources(job.data) if job.data else []) + (resolve_sources(job.heldout) if job.heldout else [])
    for source in sources:
        for f in source.files():  # DataError above for a missing path or an unsupported kind
            if f.is_file() and f.stat().st_size == 0:
                raise DataError(f"data file {f} is empty (pass a file with text in it)")
    assert job.run_dir is not None
    has_ckpt = (job.run_dir / "checkpoints" / "manifest.json").exists()
    if job.resume and not has_ckpt:
        raise QwerkyError(f"--resume: no checkpoint in {job.run_dir} (run without --resume to start)")
    if not job.resume and has_ckpt and not job.overwrite:
        raise QwerkyError(f"{job.run_dir} holds checkpoints of an earlier run: pass --resume to continue it, "
                          "--overwrite to start again, or another --run-dir")
    if job.out.exists() and any(job.out.iterdir()) and not (job.overwrite or job.resume):
        raise QwerkyError(f"output folder {job.out} exists and is not empty (pass --overwrite to replace it)")


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return None


def _full_state_dict(model: torch.nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    if not info.enabled:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of this process's own weights, taken before a stage so the guard can undo it. Under FSDP2
    that is each rank's shards: no gather, and the copy costs host memory, not GPU memory."""
    return {k: _local(v).detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _restore(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Write a `_snapshot` back in place (each rank its own shards)."""
    with torch.no_grad():
        for k, v in model.state_dict().items():
            _local(v).copy_(snapshot[k])


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], info: DistInfo) -> None:
    if not info.enabled:
        model.load_state_dict(state, strict=True)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def run_conversion(job: ConvertJob) -> dict[str, Any]:
    """Run the whole conversion; returns the report dict (also written to report.json)."""
    validate_job(job)
    recipe = job.recipe
    info = init_distributed(job.device)
    try:
        return _run(job, recipe, info)
    finally:
        cleanup(info)


def _run(job: ConvertJob, recipe: Recipe, info: DistInfo) -> dict[str, Any]:
    t_start = time.perf_counter()
    threads, why = choose_threads(recipe.train.threads)
    log.info("CPU threads: %d (%s)", threads, why)
    if info.is_main:
        print(f"qwerky: {threads} CPU thread{'s' if threads > 1 else ''}: {why}", flush=True)
    torch.manual_seed(recipe.train.seed)
    assert job.run_dir is not None
    run_dir = job.run_dir
    tokenizer = load_tokenizer(job.teacher)
    teacher = load_teacher(job.teacher, device=info.device)
    training = sorted(s for s in job.stages if s > 0 and recipe.stage(s).enabled)

    cache = None
    if job.data:
        cache_dir = job.cache_dir or run_dir / "token-cache"
        if info.is_main:
            cache = build_token_cache(job.data, tokenizer, cache_dir, heldout_paths=job.heldout or None,
                                      heldout_fraction=recipe.data.heldout_fraction, seed=recipe.data.seed,
                                      text_field=recipe.data.text_field)
        barrier(info)
        if not info.is_main:
            cache = build_token_cache(job.data, tokenizer, cache_dir, heldout_paths=job.heldout or None,
                                      heldout_fraction=recipe.data.heldout_fraction, seed=recipe.data.seed,
                                      text_field=recipe.data.text_field)

    run_dir.mkdir(parents=True, exist_ok=True)
    if job.overwrite and not job.resume and info.is_main:
        (run_dir / "log.jsonl").unlink(missing_ok=True)
        manifest = run_dir / "checkpoints" / "manifest.json"
        manifest.unlink(missing_ok=True)
    barrier(info)
    ckpt = CheckpointManager(run_dir / "checkpoints", keep=recipe.train.keep_checkpoints)
    logger = JsonlLog(run_dir / "log.jsonl", info.is_main,
                      run_dir / "tb" if recipe.train.tensorboard else None)

    resume = ckpt.load_latest() if job.resume else None
    if job.resume and resume is None:
        raise QwerkyError(f"--resume: every checkpoint in {run_dir / 'checkpoints'} is corrupt or missing")
    if resume is not None and resume.get("recipe") != recipe.to_dict():
        raise QwerkyError("--resume: the recipe differs from the checkpointed run's (same --recipe and --set needed)")
    keep_k = parse_keep_attention(recipe.student.keep_attention, teacher.config.num_hidden_layers)
    if keep_k is not None and (info.enabled or 1 not in training):
        raise QwerkyError("student.keep_attention=auto:K needs stage 1 (its cost ranking reads the trained mixers) "
                          "and a single process (not torchrun)")
    hybrid: dict[str, Any] | None = resume.get("hybrid") if resume else None
    convert_kwargs = recipe.student.convert_kwargs()
    if hybrid is not None:  # resumed after stage 1 chose the layers: the checkpoint holds that hybrid
        convert_kwargs["attention_layers"] = hybrid["layers"]
    student = convert_teacher(teacher, **convert_kwargs)
    if info.enabled or training:
        # mixers train from stage 1 on: give them their own copies of the teacher's q/k/v/o
        unshare_from_teacher(student, teacher, modules=student.mixers)
    if training and cache is not None:
        # the same first rows of the training text on every rank, so every rank calibrates the same way
        n_rows, row_len = 8, min(recipe.stage(min(training)).seq_len, len(cache.train) // 8)
        sample = torch.from_numpy(np.asarray(cache.train[: n_rows * row_len]).astype(np.int64)).view(n_rows, row_len)
        # (too little text for a sample is left to the batch loader, which names the problem)
        if row_len >= 2 and (n := calibrate_mixers(student, sample)):
            log.info("%d mixers calibrated on %d x %d tokens of the training text", n, n_rows, row_len)
    if cache is not None and resume is None and recipe.student.fit_output_scale:
        _fit_output_scales(student, teacher, cache, recipe.stage(min(training, default=1)).seq_len)
    summaries: list[dict[str, Any]] = resume["summaries"] if resume else []
    done = {s["stage"] for s in summaries}
    lora = any(s >= 3 and recipe.stage(s).lora_rank > 0 for s in training)
    unshared_all = False

    if info.enabled and lora:
        raise QwerkyError("stage3.lora_rank > 0 is for single-GPU runs; with torchrun/FSDP2 train full weights")
    if info.enabled:
        unshare_from_teacher(student, teacher)
        unshared_all = True
        from qwerky.modeling.modeling_qwerky import find_decoder_layers

        t_layers = find_decoder_layers(getattr(teacher, teacher.base_model_prefix), teacher.config.num_hidden_layers)
        if info.device.type == "cuda":
            student.float()  # fp32 master weights; FSDP computes in bf16
        shard_teacher(teacher, t_layers)
        shard_student(student, find_decoder_layers(student.model, student.config.num_hidden_layers),
                      bf16=info.device.type == "cuda" and recipe.train.precision != "fp32")
        if info.device.type == "cuda" and not fsdp_recomputes_chunked_head():
            log.warning("FSDP2 on CUDA with torch %s is untested: on torch 2.11 an earlier version of this path "
                        "failed on an H100 (docs/gpu.md); qwerky pins torch 2.13", torch.__version__)
        log.info("FSDP2: teacher and student sharded over %d process(es) (%s)%s", info.world_size,
                 "nccl" if info.device.type == "cuda" else "gloo", ", forced by QWERKY_FSDP=1" if info.forced else "")
    autocast = _autocast(recipe.train.precision, info.device)
    ac = recipe.train.activation_checkpointing
    use_ac = ac == "on" or (ac == "auto" and info.device.type == "cuda")
    evals: dict[str, Any] = {}
    windows = None
    if cache is not None and len(cache.heldout) > recipe.data.eval_seq_len:
        windows = heldout_windows(cache.heldout, recipe.data.eval_seq_len, recipe.data.eval_windows)

    if training and not info.enabled and info.device.type == "cuda":
        unshare_from_teacher(student, teacher)  # the teacher is bf16 on GPU: train fp32 master weights
        unshared_all = True
        student.float()
    if resume is not None:
        if resume.get("lora"):
            add_mlp_lora(student, resume["lora"])
        if resume.get("unshared_all") and not unshared_all:
            unshare_from_teacher(student, teacher)
            unshared_all = True
        _load_full_state_dict(student, resume["model"], info)
        evals = resume.get("evals", {})

    # Held-out evaluation is a collective under FSDP2: every rank runs it on the same windows (the sharded
    # forward needs them all) and gets the same numbers, so every rank takes the same guard decisions.
    if windows is not None and "stage0" not in evals and job.evaluate:
        evals["stage0"] = _quality(teacher, student, windows, info)
    # the stage guard (train/guard.py): each stage judged at its own context, before against after
    guard: dict[str, Any] = dict(resume.get("guard", {})) if resume else {}
    guard_on = windows is not None and job.evaluate
    tolerance = GuardTolerance(recipe.train.guard_kl_tolerance, recipe.train.guard_top1_tolerance)
    kept = resume.get("kept", "stage0") if resume else "stage0"
    teacher_context = None
    if guard_on:
        teacher_context = from_rank0(_measure_teacher_context(teacher, cache, recipe, training), info)

    checkpointed = None  # the base model whose layers are checkpointed now
    for stage in training:
        if stage in done:
            continue
        spec = _within_teacher_context(stage, recipe, teacher_context, info.is_main)
        if stage >= 3 and not unshared_all:
            unshare_from_teacher(student, teacher)
            unshared_all = True
        lora_rank = spec.lora_rank if stage >= 3 else 0
        if lora_rank and not any("lora_" in n for n, _ in student.named_parameters()):
            add_mlp_lora(student, lora_rank)
        assert cache is not None
        recall = (RecallRows(recipe.data.recall_fraction, recipe.data.recall_min_gap, spec.seq_len,
                             seed=recipe.data.seed + stage) if recipe.data.recall_fraction else None)
        batches = PackedBatches(cache.train, spec.seq_len, spec.batch_size, seed=recipe.data.seed + stage,
                                rank=info.rank, world_size=info.world_size, recall=recall)
        params = trainable_parameters(stage, student, spec)
        # Stage 1 bounds its memory per mixer (stages.Stage1), never per layer: under FSDP2 the loss reads
        # each mixer's output, not its layer's, so the layer's unit would never be unsharded before its
        # recomputation.
        stage_ac = use_ac and stage > 1
        if ac == "auto" and stage > 1 and info.device.type == "cpu":
            stage_ac, why = stage_needs_checkpointing(student.config, stage, spec)
            log.info("stage %d: activation checkpointing %s (auto: %s)", stage, "on" if stage_ac else "off", why)
        if stage_ac:
            student.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            checkpointed = student.model
        elif checkpointed is student.model:
            student.model.gradient_checkpointing_disable()
        student.train()
        taps = TeacherTaps(teacher) if stage == 1 else None
        stage_resume = resume["stage_state"] if resume is not None and resume.get("stage") == stage else None
        own_windows, snapshot = None, None
        if guard_on:
            own_windows = _stage_windows(cache.heldout, spec.seq_len, recipe, windows)
            entry = guard.setdefault(f"stage{stage}", {"seq_len": int(own_windows.shape[1]), "starts_from": kept})
            if "before" not in entry:  # a resumed stage keeps the judgement of the model it started from
                entry["before"] = _quality(teacher, student, own_windows, info, baseline=False)
            if recipe.train.keep == "best" and stage_resume is None:
                snapshot = _snapshot(student)

        def save(payload: dict[str, Any], stage: int = stage, unshared_all: bool = unshared_all,
                 lora_rank: int = lora_rank, kept: str = kept, student: Any = student,
                 hybrid: dict[str, Any] | None = hybrid) -> None:
            model_state = _full_state_dict(student, info)
            if info.is_main:
                ckpt.save({"stage": stage, "stage_state": payload, "model": model_state, "summaries": summaries,
                           "recipe": recipe.to_dict(), "evals": evals, "unshared_all": unshared_all,
                           "lora": lora_rank or (resume or {}).get("lora", 0), "guard": guard, "kept": kept,
                           "hybrid": hybrid}, tag=f"stage{stage}-step{payload['step']:08d}")
            barrier(info)

        try:
            recompute = ac != "off"
            step_fn = make_step_fn(stage, spec, student, teacher, taps, autocast, recompute=recompute)
            head_recomputed = (spec.loss == "ce" or info.enabled) and (
                not info.enabled or fsdp_recomputes_chunked_head())
            flops = FlopModel.from_models(teacher, student).step_flops(
                stage, spec.seq_len, spec.loss, lora=lora_rank > 0, recompute_layers=stage_ac,
                recompute_head=head_recomputed, recompute_mixers=info.enabled and recompute,
                stage1_student_forward=info.enabled)
            summary = run_stage(stage, spec, params, step_fn, batches, info, logger, save,
                                recipe.train.checkpoint_every, stage_resume, STAGE_NAMES[stage],
                                flops_per_token=flops["total"],
                                checkpoint_minutes=recipe.train.checkpoint_minutes)
        finally:
            if taps is not None:
                taps.remove()
        student.eval()
        summary["name"] = STAGE_NAMES[stage]
        summary["seq_len"] = spec.seq_len
        summaries.append(summary)
        if windows is not None and job.evaluate:
            evals[f"stage{stage}"] = _quality(teacher, student, windows, info)
        kept = f"stage{stage}"
        if own_windows is not None:
            entry = guard[f"stage{stage}"]
            entry["after"] = (evals[kept] if own_windows is windows
                              else _quality(teacher, student, own_windows, info, baseline=False))
            verdict = judge(entry["before"]["student"], entry["after"]["student"], tolerance)
            verdict = from_rank0(verdict, info)
            undo, action = decide(stage, verdict, recipe.train.keep, snapshot is not None)
            if undo:
                _restore(student, snapshot)
                kept = entry["starts_from"]
                action = f"undone: the weights from before it are kept (train.keep=best, {kept})"
            entry.update(verdict, action=action, message=describe(stage, entry["seq_len"], verdict, action))
            (log.warning if verdict["regressed"] else log.info)("stage guard: %s", entry["message"])
            if verdict["regressed"] and info.is_main:
                print(f"qwerky: warning: {entry['message']}", flush=True)
        snapshot = None
        if stage == 1 and keep_k is not None and hybrid is None:
            if windows is None:
                raise QwerkyError("student.keep_attention=auto:K ranks layers on held-out text: pass --heldout "
                                  "or more --data (and leave evaluation on)")
            hybrid = _choose_hybrid(teacher, student, windows, keep_k, recipe.train.seed)
            student = _rebuild_as_hybrid(student, teacher, recipe, hybrid["layers"])
            log.info("hybrid: layers %s keep the teacher's attention (greedy steps %s; one-at-a-time costs %s)",
                     hybrid["layers"], [(g["added"], round(g["kl"], 4)) for g in hybrid["greedy"]],
                     [round(c, 4) for c in hybrid["costs"]])
            print(f"qwerky: hybrid: keeping layers {hybrid['layers']} as attention (chosen greedily on held-out "
                  "KL after stage 1)", flush=True)
        model_state = _full_state_dict(student, info)
        if info.is_main:
            ckpt.save({"stage": stage + 1, "stage_state": None, "model": model_state, "summaries": summaries,
                       "recipe": recipe.to_dict(), "evals": evals, "unshared_all": unshared_all,
                       "lora": lora_rank or (resume or {}).get("lora", 0), "guard": guard, "kept": kept,
                       "hybrid": hybrid}, tag=f"stage{stage}-done")
        barrier(info)

    report: dict[str, Any] = {}
    final_state = _full_state_dict(student, info) if info.enabled else None  # a collective: every rank
    if info.is_main:
        export_model = student
        if info.enabled:
            export_model = convert_teacher(load_teacher(job.teacher), **recipe.student.convert_kwargs())
            unshare_from_teacher(export_model, teacher)
            if lora:
                add_mlp_lora(export_model, max(recipe.stage(s).lora_rank for s in training if s >= 3))
            export_model.load_state_dict(final_state)
        if any("lora_" in n for n, _ in export_model.named_parameters()):
            merge_lora(export_model)
        quality = evals.get(kept if guard_on else f"stage{training[-1]}" if training else "stage0")
        report = {
            "teacher": str(job.teacher), "out": str(job.out), "recipe": recipe.to_dict(),
            "stages": summaries, "quality": quality, "quality_by_stage": evals,
            "teacher_context": teacher_context, "hybrid": hybrid,
            "guard": {"keep": recipe.train.keep, "kept": kept if guard_on else None,
                      "tolerance": {"kl_relative": tolerance.kl_relative, "top1_points": tolerance.top1_points},
                      "stages": guard},
            "data": {"train_tokens": int(len(cache.train)) if cache is not None else 0,
                     "heldout_tokens": int(len(cache.heldout)) if cache is not None else 0,
                     "eval_windows": int(windows.shape[0]) if windows is not None else 0,
                     "eval_seq_len": recipe.data.eval_seq_len},
            "wall_s": round(time.perf_counter() - t_start, 1),
            "parallel": {"fsdp2": info.enabled, "world_size": info.world_size, "forced": info.forced,
                         "device": str(info.device)},
        }
        md = render_report_md(report)
        save_student(export_model, tokenizer, job.out, extra_files={"report.json": report, "report.md": md})
        atomic_write_json(run_dir / "report.json", report)
        atomic_write_bytes(run_dir / "report.md", md.encode())
    barrier(info)
    return report


def _choose_hybrid(teacher: torch.nn.Module, student: Any, windows: torch.Tensor, k: int, seed: int
                   ) -> dict[str, Any]:
    """Choose the kept layers greedily (train/hybrid.py); the one-at-a-time costs and the curve for every K."""
    from qwerky.train.hybrid import MEMORY_AT, HybridScorer, curve, greedy_choice, layer_costs

    student.eval()
    mixers = list(student.mixers)
    scorer = HybridScorer(teacher, mixers, windows)  # the teacher's reference logits once, for every score
    costs = layer_costs(teacher, mixers, windows, scorer=scorer)
    cfg = student.config
    kv_per_token = 2 * cfg.num_kv_heads * cfg.head_dim * next(teacher.parameters()).element_size()
    state = mixers[0].init_state(1, "cpu")
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())
    greedy = greedy_choice(teacher, mixers, windows, k, scorer=scorer)
    rows = curve(teacher, mixers, windows, costs, kv_per_token, state_bytes, seed=seed, greedy=greedy,
                 scorer=scorer)
    return {"keep": k, "layers": greedy[-1]["layers"] if greedy else [], "method": "greedy", "greedy": greedy,
            "costs": costs, "curve": rows, "memory_context": MEMORY_AT}


def _rebuild_as_hybrid(old: Any, teacher: torch.nn.Module, recipe: Recipe, layers: list[int]) -> Any:
    """A new student keeping `layers` as the teacher's attention, with the other mixers as stage 1 left them."""
    new = convert_teacher(teacher, **{**recipe.student.convert_kwargs(), "attention_layers": layers})
    unshare_from_teacher(new, teacher, modules=new.mixers)  # loading below must not write into the teacher
    attn = new.config.attention_name
    trained = {k: v for k, v in old.state_dict().items()
               if ".layers." in k and f".{attn}." in k and int(k.split(".layers.")[1].split(".")[0]) not in layers}
    own = new.state_dict()
    new.load_state_dict({k: v for k, v in trained.items() if k in own and own[k].shape == v.shape}, strict=False)
    return new


def _measure_teacher_context(teacher: torch.nn.Module, cache: Any, recipe: Recipe, training: list[int]
                             ) -> dict[str, Any] | None:
    """The teacher's effective context on the held-out text, out to the longest stage (eval/teacher_context)."""
    from qwerky.eval.teacher_context import describe, teacher_effective_context

    longest = max((recipe.stage(s).seq_len for s in training), default=0)
    if recipe.train.teacher_context == "off" or longest < 128 or len(cache.heldout) <= longest:
        return None
    windows = heldout_windows(cache.heldout, longest, 64)
    teacher.eval()
    result = teacher_effective_context(teacher, windows)
    result["message"] = describe(result)
    # too little long held-out text to tell (eval/teacher_context): no stage is checked against it; say so
    log.log(logging.WARNING if result.get("status") == "not_enough_data" else logging.INFO,
            "teacher context: %s", result["message"])
    return result


def _within_teacher_context(stage: int, recipe: Recipe, context: dict[str, Any] | None,
                            is_main: bool = True) -> Any:
    """The stage's spec; warned about (and with train.teacher_context=cap shortened) when it trains past the
    teacher's effective context. The recipe itself is left as written (resume compares it)."""
    spec = recipe.stage(stage)
    if context is None or not context["degrades"] or spec.seq_len <= context["effective"]:
        return spec
    target = "its KL target is the teacher's own output there" if spec.loss == "kl" else "it trains on CE there"
    message = (f"stage {stage} trains at {spec.seq_len} tokens, past the teacher's effective context of "
               f"{context['effective']} measured on the held-out text; {target}")
    if recipe.train.teacher_context == "cap":
        context.setdefault("capped", {})[f"stage{stage}"] = [spec.seq_len, context["effective"]]
        spec = dataclasses.replace(spec, seq_len=int(context["effective"]))
        message += f"; capped to {spec.seq_len} tokens (train.teacher_context=cap)"
    else:
        message += "; set train.teacher_context=cap to train there at the effective context"
        if spec.loss == "kl":
            message += f", or stage{stage}.loss=ce for a teacher that is weak there"
    context.setdefault("warnings", []).append(message)
    log.warning("%s", message)
    if is_main:
        print(f"qwerky: warning: {message}", flush=True)
    return spec


def _stage_windows(heldout: Any, seq_len: int, recipe: Recipe, common: torch.Tensor) -> torch.Tensor:
    """Held-out windows at a stage's training context (the common ones when that is their length, or when the
    held-out text is too short for even one window of it)."""
    if seq_len == common.shape[1] or len(heldout) <= seq_len:
        return common
    return heldout_windows(heldout, seq_len, recipe.data.eval_windows)


def _fit_output_scales(student: torch.nn.Module, teacher: torch.nn.Module, cache: Any, seq_len: int,
                       rows: int = 8) -> None:
    """Stage 0's per-head output scales (train/warm_start.py) on the first rows of the training text, the same
    rows on every rank; the log names the layers' relative error to their attention before and after."""
    row_len = min(seq_len, len(cache.train) // rows)
    if row_len < 2:
        return
    sample = torch.from_numpy(np.asarray(cache.train[: rows * row_len]).astype(np.int64)).view(rows, row_len)
    t0 = time.perf_counter()
    report = fit_output_scales(student, teacher, sample)
    if not report:
        return
    before = [r["rel_error_before"] for r in report.values()]
    after = [r["rel_error_after"] for r in report.values()]
    log.info("stage 0: per-head output scales fitted to the teacher's attention on %d x %d tokens in %.0f s: "
             "relative error per layer %.2f-%.2f before, %.2f-%.2f after", rows, row_len,
             time.perf_counter() - t0, min(before), max(before), min(after), max(after))


def _quality(teacher: torch.nn.Module, student: torch.nn.Module, windows: torch.Tensor, info: DistInfo,
             baseline: bool = True) -> dict[str, Any]:
    from qwerky.eval.models import window_baseline
    from qwerky.eval.quality import compare_models

    was_training = student.training
    student.eval()
    baseline = window_baseline(teacher) if baseline and not info.enabled else None  # its zero-gated branch not run
    with torch.no_grad():
        result = compare_models(teacher, student, windows.to(info.device), baseline=baseline)
    if info.enabled:
        reshard(teacher, student)
    student.train(was_training)
    return result


def render_report_md(report: dict[str, Any]) -> str:
    """A short markdown report: quality table (teacher, student, window baseline) and per-stage costs."""
    lines = ["# qwerky conversion report", "", f"Teacher: `{report['teacher']}`  ", f"Student: `{report['out']}`  ",
             f"Wall time: {report['wall_s']} s", ""]
    tc = report.get("teacher_context")
    if tc:
        lines += [f"Teacher context: {tc['message']}.", ""]
        lines += [f"**Warning:** {w}." for w in tc.get("warnings", [])] + ([""] if tc.get("warnings") else [])
    g = report.get("guard") or {}
    regressed = [e for e in (g.get("stages") or {}).values() if e.get("regressed")]
    for e in regressed:
        lines += [f"**Warning:** {e['message']}", ""]
    if g.get("kept") and report.get("stages") and g["kept"] != f"stage{report['stages'][-1]['stage']}":
        lines += [f"Exported: the weights after {g['kept']} (train.keep={g['keep']}); the quality table is theirs.", ""]
    q = report.get("quality")
    if q:
        lines += ["## Held-out quality", "",
                  "| model | perplexity | ppl / teacher | KL(teacher‖model) | top-1 agreement |",
                  "|---|---|---|---|---|"]
        t_ppl = q.get("teacher", {}).get("ppl")
        for name in ("teacher", "student", "baseline"):
            m = q.get(name)
            if not m:
                continue
            ratio = m["ppl"] / t_ppl if t_ppl else float("nan")
            kl = m.get("kl")
            agree = m.get("top1")
            label = {"baseline": "window baseline (64 + 4 sinks)"}.get(name, name)
            lines.append(f"| {label} | {m['ppl']:.3f} | {ratio:.3f} | "
                         f"{'-' if kl is None else f'{kl:.4f}'} | {'-' if agree is None else f'{agree:.1%}'} |")
        lines.append("")
    by_stage = report.get("quality_by_stage") or {}
    if by_stage:
        lines += [f"## What each stage bought (at the common {report.get('data', {}).get('eval_seq_len', '')}-token "
                  "context)", "", "| after | student ppl / teacher | KL | top-1 agreement |",
                  "|---|---|---|---|"]
        for key, q in by_stage.items():
            s, t = q.get("student", {}), q.get("teacher", {})
            ratio = s.get("ppl", float("nan")) / t.get("ppl", float("nan"))
            lines.append(f"| {key} | {ratio:.3f} | {s.get('kl', float('nan')):.4f} | "
                         f"{s.get('top1', float('nan')):.1%} |")
        lines.append("")
    hy = report.get("hybrid")
    if hy:
        lines += [f"## Hybrid: {hy['keep']} layers keep the teacher's attention ({hy['layers']})", ""]
        for step in hy.get("greedy", []):
            cands = ", ".join(f"{i}: {kl:.4f}" for i, kl in step["candidates"].items())
            lines.append(f"- greedy step {len(step['layers'])}: keep layer {step['added']} (KL with each candidate "
                         f"kept: {cands})")
        lines += ["", "Cost of converting each layer alone after stage 1 (KL): "
                  + ", ".join(f"{i}: {c:.4f}" for i, c in enumerate(hy["costs"])), "",
                  f"| kept | auto (greedy): layers | KL | top-1 | one at a time: layers | KL | top-1 | "
                  f"random: layers | KL | top-1 | memory / sequence at {hy['memory_context']} |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]

        def cells(entry: dict[str, Any] | None) -> str:
            return "- | - | -" if entry is None else f"{entry['layers']} | {entry['kl']:.4f} | {entry['top1']:.1%}"

        for row in hy["curve"]:
            ranked = row.get("ranked", row.get("auto"))  # reports written before the greedy choice
            lines.append(f"| {row['keep']} | {cells(row.get('auto'))} | {cells(ranked)} | {cells(row['random'])} | "
                         f"{row['memory_bytes_at_8k'] / 2**20:.2f} MiB |")
        lines += ["", "(after stage 1, every other layer converted; measured on the teacher with hooks)", ""]
    if g.get("stages"):
        lines += ["## Stage guard (each stage at its own training context: before -> after)", "",
                  "| stage | context | KL | top-1 agreement | verdict |", "|---|---|---|---|---|"]
        for key, e in g["stages"].items():
            if "after" not in e:
                continue
            b, a = e["before"]["student"], e["after"]["student"]
            verdict = ("worse: " if e["regressed"] else "") + e["action"]
            lines.append(f"| {key} | {e['seq_len']} | {b['kl']:.4f} -> {a['kl']:.4f} | {b['top1']:.1%} -> "
                         f"{a['top1']:.1%} | {verdict} |")
        lines.append("")
    if report.get("stages"):
        lines += ["## Stages", "", "| stage | what | tokens | seq len | wall s | tokens/s | GFLOP/s | peak RSS GiB | "
                  "final loss |", "|---|---|---|---|---|---|---|---|---|"]
        for s in report["stages"]:  # GFLOP/s: train/flops.py; reports written before it have none
            lines.append(f"| {s['stage']} | {s['name']} | {s['tokens']:,} | {s['seq_len']} | {s['wall_s']} | "
                         f"{s['tokens_per_s']:,.0f} | {s.get('gflop_s', '-')} | {s.get('peak_rss_gib', '-')} | "
                         f"{s['final_loss']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def load_report(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
