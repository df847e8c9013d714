"""The main job: teacher folder + text -> converted student folder + quality report.

`run_conversion` validates every input (nothing is written before that) and runs a `Conversion`, whose
phases are its methods, in this order:

- `prepare`: tokenizer, teacher, the token cache (built once), the run directory and its log, the resumed
  checkpoint if any, then the student: stage-0 surgery, its own copies of the weights it will train
  (`unshare`), calibration, the output-scale fit, parallelism (FSDP2) applied by a function, held-out
  windows, stage 0's evaluation and the teacher's effective context;
- per stage (`run_stage`): `make_trainable`, `train`, `evaluate`, `guard_stage`, the hybrid choice after
  stage 1, and a checkpoint at the stage's end;
- `checkpoint`: the one payload builder, for mid-stage and stage-end checkpoints alike;
- `finish`: export and report.json / report.md.

The run's state lives on the object (`RunState` is the part a checkpoint carries). Checkpoints are written
after surgery, every `train.checkpoint_every` steps or `train.checkpoint_minutes`, and at every stage's end;
each holds the weights some stage has trained (and the optimiser), not the frozen teacher's, which surgery
rebuilds. `resume=True` continues from the newest good one: same weights, optimiser, schedule, data position
and RNG; the killed run's log lines after it are replaced by one "resumed" record; with no checkpoint yet it
starts afresh. A stage that diverges (loop.NonFiniteTraining) drops its own checkpoints, so a resume starts it
again, with a changed learning rate if given. User-facing notices go to the `qwerky.notice` logger (the CLI
prints them); report.md is rendered by `qwerky.eval.report`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwerky.data import DataError, PackedBatches, RecallRows, build_token_cache, heldout_windows
from qwerky.data.sources import resolve_sources
from qwerky.errors import QwerkyError
from qwerky.eval.report import render_report_md
from qwerky.surgery import calibrate_mixers, convert_teacher, save_student, unshare_from_teacher
from qwerky.teacher import check_model_dir, load_teacher, load_tokenizer
from qwerky.threads import choose_threads

from .checkpoint import (
    CheckpointManager,
    atomic_write_bytes,
    atomic_write_json,
    full_state_dict,
    load_full_state_dict,
    restore,
    snapshot,
)
from .flops import FlopModel
from .guard import GuardTolerance, decide, describe, judge
from .hybrid import choose_hybrid, parse_keep_attention, rebuild_as_hybrid
from .loop import JsonlLog, NonFiniteTraining, run_stage
from .memory import stage_needs_checkpointing
from .parallel import (
    DistInfo,
    apply_activation_checkpointing,
    apply_fsdp,
    autocast_for,
    barrier,
    cleanup,
    from_rank0,
    fsdp_recomputes_chunked_head,
    init_distributed,
    main_first,
    reshard,
)
from .recipe import Recipe
from .stages import STAGE_NAMES, TeacherTaps, add_mlp_lora, make_step_fn, merge_lora, trainable_parameters
from .warm_start import fit_output_scales

__all__ = ["ConvertJob", "Conversion", "RunState", "validate_job", "run_conversion", "load_report",
           "render_report_md", "NOTICE_LOGGER"]

log = logging.getLogger(__name__)
NOTICE_LOGGER = "qwerky.notice"  # lines meant for the user (the CLI prints them as "qwerky: ...")
notice = logging.getLogger(NOTICE_LOGGER)


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
    if any(s > 0 for s in job.stages) and not job.data:
        raise QwerkyError("training stages need text: pass --data FILE... (.txt, .jsonl, .jsonl.gz, .parquet, "
                          "or a saved datasets folder), or --stages 0 for conversion only")
    _check_text(job.data + job.heldout)
    _check_outputs(job)


def _check_text(paths: list[Path]) -> None:
    """Every data path exists, is of a kind qwerky reads (DataError from resolve_sources) and is not empty."""
    for source in resolve_sources(paths) if paths else []:
        for f in source.files():
            if f.is_file() and f.stat().st_size == 0:
                raise DataError(f"data file {f} is empty (pass a file with text in it)")


def _check_outputs(job: ConvertJob) -> None:
    """An earlier run's checkpoints or output are never overwritten unasked (--resume without a checkpoint is
    a fresh start, which scripted retries need)."""
    assert job.run_dir is not None
    has_ckpt = (job.run_dir / "checkpoints" / "manifest.json").exists()
    if not job.resume and has_ckpt and not job.overwrite:
        raise QwerkyError(f"{job.run_dir} holds checkpoints of an earlier run: pass --resume to continue it, "
                          "--overwrite to start again, or another --run-dir")
    if job.out.exists() and any(job.out.iterdir()) and not (job.overwrite or job.resume):
        raise QwerkyError(f"output folder {job.out} exists and is not empty (pass --overwrite to replace it)")


def run_conversion(job: ConvertJob) -> dict[str, Any]:
    """Run the whole conversion; returns the report dict (also written to report.json)."""
    validate_job(job)
    info = init_distributed(job.device)
    try:
        return Conversion(job, info).run()
    finally:
        cleanup(info)


@dataclass
class RunState:
    """What the run has done besides its weights: carried by every checkpoint, read back on resume."""

    summaries: list[dict[str, Any]] = field(default_factory=list)  # one per finished stage
    evals: dict[str, Any] = field(default_factory=dict)  # held-out quality after each stage ("stage0", ...)
    guard: dict[str, Any] = field(default_factory=dict)  # the stage guard's entry per stage
    kept: str = "stage0"  # the stage whose weights the student holds (the guard may have undone later ones)
    hybrid: dict[str, Any] | None = None  # the layers a hybrid keeps as attention, once chosen after stage 1
    unshared_all: bool = False  # the student owns every weight (not only its mixers')
    lora: int = 0  # rank of the MLP LoRA adapters in the student (0: none)
    trained: list[str] = field(default_factory=list)  # weights some stage has trained: checkpoints hold them

    def to_payload(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> RunState:
        return cls(summaries=payload["summaries"], evals=payload.get("evals", {}), guard=dict(payload.get("guard", {})),
                   kept=payload.get("kept", "stage0"), hybrid=payload.get("hybrid"),
                   unshared_all=bool(payload.get("unshared_all")), lora=int(payload.get("lora") or 0),
                   trained=list(payload.get("trained", [])))


@dataclass
class StageGuard:
    """What the guard keeps while a stage trains: the windows at its context and the weights from before it."""

    windows: torch.Tensor
    saved: dict[str, torch.Tensor] | None


class Conversion:
    """One conversion run: its inputs, models, data and `RunState`, and its phases as methods (module doc)."""

    def __init__(self, job: ConvertJob, info: DistInfo) -> None:
        assert job.run_dir is not None
        self.job, self.recipe, self.info, self.run_dir = job, job.recipe, info, job.run_dir
        self.training = sorted(s for s in job.stages if s > 0 and self.recipe.stage(s).enabled)
        self.state = RunState()
        self.t_start = time.perf_counter()
        self.resume: dict[str, Any] | None = None  # the checkpoint resumed from
        self.cache: Any = None
        self.windows: torch.Tensor | None = None  # held-out windows at the common evaluation context
        self.teacher_context: dict[str, Any] | None = None
        self.keep_k: int | None = None

    # --- the whole run -------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.prepare()
        done = {s["stage"] for s in self.state.summaries}
        for stage in self.training:
            if stage not in done:
                self.run_stage(stage)
        return self.finish()

    @property
    def guard_on(self) -> bool:
        return self.windows is not None and self.job.evaluate

    def say(self, message: str, level: int = logging.INFO) -> None:
        """A line for the user: the notice logger on rank 0 (the CLI prints it), the module log elsewhere."""
        (notice if self.info.is_main else log).log(level, "%s", message)

    # --- prepare -------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        threads, why = choose_threads(self.recipe.train.threads)
        self.say(f"{threads} CPU thread{'s' if threads > 1 else ''}: {why}")
        torch.manual_seed(self.recipe.train.seed)
        self.tokenizer = load_tokenizer(self.job.teacher)
        self.teacher = load_teacher(self.job.teacher, device=self.info.device)
        self.cache = self.token_cache()
        self.open_run_dir()
        self.load_resume()
        self.check_options()
        self.build_student()
        if self.cache is not None and len(self.cache.heldout) > self.recipe.data.eval_seq_len:
            self.windows = heldout_windows(self.cache.heldout, self.recipe.data.eval_seq_len,
                                           self.recipe.data.eval_windows)
        if self.resume is not None:
            self.load_weights(self.resume["model"])
        # Held-out evaluation is a collective under FSDP2: every rank runs it on the same windows (the sharded
        # forward needs them all) and gets the same numbers, so every rank takes the same guard decisions.
        if self.windows is not None and "stage0" not in self.state.evals and self.job.evaluate:
            self.state.evals["stage0"] = _quality(self.teacher, self.student, self.windows, self.info)
        if self.guard_on:
            self.teacher_context = from_rank0(
                _measure_teacher_context(self.teacher, self.cache, self.recipe, self.training), self.info)
        if self.training and self.resume is None:  # a kill or a diverged stage 1 goes back here, not to surgery
            self.checkpoint(self.training[0], None, tag="stage0-done")

    def token_cache(self) -> Any:
        """The tokenised text (None without --data): rank 0 builds it, the other ranks then read it."""
        if not self.job.data:
            return None
        data = self.recipe.data
        return main_first(self.info, lambda: build_token_cache(
            self.job.data, self.tokenizer, self.job.cache_dir or self.run_dir / "token-cache",
            heldout_paths=self.job.heldout or None, heldout_fraction=data.heldout_fraction, seed=data.seed,
            text_field=data.text_field))

    def open_run_dir(self) -> None:
        """The run directory, its checkpoints and its step log (an --overwrite run starts both afresh)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.job.overwrite and not self.job.resume and self.info.is_main:
            (self.run_dir / "log.jsonl").unlink(missing_ok=True)
            (self.run_dir / "checkpoints" / "manifest.json").unlink(missing_ok=True)
        barrier(self.info)
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", keep=self.recipe.train.keep_checkpoints)
        self.logger = JsonlLog(self.run_dir / "log.jsonl", self.info.is_main,
                               self.run_dir / "tb" if self.recipe.train.tensorboard else None)

    def load_resume(self) -> None:
        """With --resume: the newest good checkpoint and the run state it carries, and a "resumed" record in the
        log in place of what the killed run logged after it; with no checkpoint yet, a fresh start (a notice).
        Checks what resuming needs."""
        if self.job.resume and self.ckpt.newest_tag() is None:
            message = f"--resume: no checkpoint in {self.run_dir} yet; starting from the beginning"
            self.logger.resume_at(0, 0, {"event": "resumed", "stage": 0, "step": 0, "checkpoint": None,
                                         "message": message})
            self.say(message, logging.WARNING)
        elif self.job.resume:
            self.resume_from_checkpoint()

    def check_options(self) -> None:
        """Recipe choices this teacher or this process layout cannot take."""
        self.keep_k = parse_keep_attention(self.recipe.student.keep_attention, self.teacher.config.num_hidden_layers)
        if self.keep_k is not None and (self.info.enabled or 1 not in self.training):
            raise QwerkyError("student.keep_attention=auto:K needs stage 1 (its cost ranking reads the trained "
                              "mixers) and a single process (not torchrun)")
        if self.info.enabled and any(s >= 3 and self.recipe.stage(s).lora_rank > 0 for s in self.training):
            raise QwerkyError("stage3.lora_rank > 0 is for single-GPU runs; with torchrun/FSDP2 train full weights")

    def resume_from_checkpoint(self) -> None:
        self.resume = self.ckpt.load_latest()
        if self.resume is None:
            raise QwerkyError(f"--resume: every checkpoint in {self.run_dir / 'checkpoints'} is corrupt or missing "
                              "(pass --overwrite to start again)")
        stage, step = self.resume["stage"], (self.resume["stage_state"] or {}).get("step", 0)
        changed = _recipe_changes(self.resume.get("recipe") or {}, self.recipe.to_dict(), stage, started=step > 0)
        if changed:
            raise QwerkyError(f"--resume: the recipe differs from the checkpointed run's in {', '.join(changed)} "
                              f"(same --recipe and --set needed; only stages not begun yet, stage{stage} on, may "
                              "change)")
        self.state = RunState.from_payload(self.resume)
        tag = self.ckpt.loaded_tag
        record = self.logger.resume_at(stage, step, {
            "event": "resumed", "stage": stage, "step": step, "checkpoint": tag,
            "message": f"resumed at stage {stage} step {step} from checkpoint {tag}"})
        self.say(f"resumed at stage {stage} step {step} from checkpoint {tag} ({record['dropped_records']} log "
                 f"records after it dropped: {record['redone_s']} s of steps to do again)")

    def build_student(self) -> None:
        """Stage 0: surgery, the student's own copies of what it trains, calibration and the output-scale fit
        on the first rows of the training text, then parallelism and precision."""
        kwargs = self.recipe.student.convert_kwargs()
        if self.state.hybrid is not None:  # resumed after stage 1 chose the layers: the checkpoint holds that hybrid
            kwargs["attention_layers"] = self.state.hybrid["layers"]
        self.student = convert_teacher(self.teacher, **kwargs)
        self.owns = ""  # what of the teacher's weights this student has its own copies of: "", "mixers", "all"
        self.unshare()
        if self.training and self.cache is not None:
            first = self.recipe.stage(min(self.training)).seq_len
            # the same first rows on every rank, so every rank calibrates the same way (too little text for a
            # sample is left to the batch loader, which names the problem)
            sample = _first_rows(self.cache, 8, first)
            if sample is not None and (n := calibrate_mixers(self.student, sample)):
                log.info("%d mixers calibrated on %d x %d tokens of the training text", n, *sample.shape)
        if self.cache is not None and self.resume is None and self.recipe.student.fit_output_scale:
            _fit_output_scales(self.student, self.teacher, self.cache,
                               self.recipe.stage(min(self.training, default=1)).seq_len)
        if self.info.enabled:
            apply_fsdp(self.student, self.teacher, self.info, self.recipe.train.precision)
        elif self.training and self.info.device.type == "cuda":
            self.student.float()  # the teacher is bf16 on GPU: train fp32 master weights
        if self.state.lora:
            add_mlp_lora(self.student, self.state.lora)

    def unshare(self, stage: int = 0) -> None:
        """Give the student its own copies of the teacher's tensors it will train (the one place that decides):
        the mixers' from stage 1 on; every weight from stage 3 on, under FSDP2 (shards are per model) and on
        CUDA (fp32 master weights over a bf16 teacher). Idempotent."""
        everything = (stage >= 3 or self.state.unshared_all or self.info.enabled
                      or (bool(self.training) and self.info.device.type == "cuda"))
        level = "all" if everything else "mixers" if self.training else ""
        if level and level != self.owns and self.owns != "all":
            unshare_from_teacher(self.student, self.teacher, modules=None if level == "all" else self.student.mixers)
            self.owns = level
        self.state.unshared_all = self.owns == "all"

    def stored_keys(self) -> set[str]:
        """The weights a checkpoint holds: the mixers' (calibrated, fitted and trained from stage 1 on), every
        weight some stage has trained so far, and any the teacher has no counterpart of. The rest are the
        frozen teacher's, as stage-0 surgery rebuilds them on resume, so they are not written again."""
        attn = f".{self.student.config.attention_name}."
        if not hasattr(self, "_teacher_keys"):
            self._teacher_keys = set(self.teacher.state_dict())
        trained = set(self.state.trained)  # (names a hybrid rebuild removed are not this student's: not asked)
        return {k for k in self.student.state_dict()
                if (".layers." in k and attn in k) or k not in self._teacher_keys or k in trained}

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """A checkpoint's weights into the rebuilt student: every key it must hold, and no other."""
        own = set(self.student.state_dict())
        missing, unknown = sorted(self.stored_keys() - set(state)), sorted(set(state) - own)
        if missing or unknown:
            raise QwerkyError(f"--resume: the checkpoint does not fit this student (weights missing {missing[:3]}, "
                              f"unknown {unknown[:3]}); resume with the same --teacher, or pass --overwrite")
        load_full_state_dict(self.student, state, self.info, strict=set(state) == own)

    # --- one stage -----------------------------------------------------------------------------------------

    def run_stage(self, stage: int) -> None:
        spec = _within_teacher_context(stage, self.recipe, self.teacher_context, self.say)
        params = self.make_trainable(stage, spec)
        resumed = self.resume["stage_state"] if self.resume is not None and self.resume.get("stage") == stage else None
        guard = self.guard_before(stage, spec, mid_stage=resumed is not None)
        try:
            summary = self.train(stage, spec, params, resumed)
        except NonFiniteTraining as err:
            raise NonFiniteTraining(f"{err} {self.roll_back(stage)}") from None
        self.state.summaries.append(summary)
        self.evaluate(stage)
        self.state.kept = f"stage{stage}"
        if guard is not None:
            self.guard_stage(stage, guard)
        if stage == 1 and self.keep_k is not None and self.state.hybrid is None:
            self.choose_hybrid()
        self.checkpoint(stage + 1, None, tag=f"stage{stage}-done")

    def roll_back(self, stage: int) -> str:
        """After a stage diverged: its own checkpoints go, so --resume starts it again from its first step (its
        optimiser and schedule were built for the learning rate that diverged; a changed stage{S}.lr is then
        accepted). Returns a sentence saying where the run now resumes."""
        if self.info.is_main:
            self.ckpt.drop(lambda tag: tag.startswith(f"stage{stage}-step"))
        barrier(self.info)
        tag = self.ckpt.newest_tag()
        if tag is None:
            return "There is no checkpoint before it: rerun without --resume."
        return (f"Stage {stage}'s own checkpoints were dropped, so --resume starts it again from checkpoint {tag} "
                f"(a changed stage{stage} section is accepted there).")

    def make_trainable(self, stage: int, spec: Any) -> list[torch.nn.Parameter]:
        """The stage's trainable parameters (requires_grad set): own copies first, LoRA adapters when asked."""
        self.unshare(stage)
        rank = spec.lora_rank if stage >= 3 else 0
        if rank and not self.state.lora:
            add_mlp_lora(self.student, rank)
            self.state.lora = rank
        params = trainable_parameters(stage, self.student, spec)
        trainable = {n for n, p in self.student.named_parameters(remove_duplicate=False) if p.requires_grad}
        self.state.trained = sorted(set(self.state.trained) | trainable)
        return params

    def layer_checkpointing(self, stage: int, spec: Any) -> bool:
        """Whether this stage recomputes the student's decoder layers in backward (train.activation_checkpointing:
        on; off; auto = on CUDA, and on a CPU when plan's activation estimate exceeds a quarter of RAM). Stage 1
        bounds its memory per mixer (stages.Stage1), never per layer: under FSDP2 its loss reads each mixer's
        output, not its layer's, so the layer's unit would never be unsharded before its recomputation."""
        mode = self.recipe.train.activation_checkpointing
        if stage == 1 or mode == "off":
            return False
        if mode == "auto" and self.info.device.type == "cpu":
            on, why = stage_needs_checkpointing(self.student.config, stage, spec)
            log.info("stage %d: activation checkpointing %s (auto: %s)", stage, "on" if on else "off", why)
            return on
        return True

    def train(self, stage: int, spec: Any, params: list[torch.nn.Parameter],
              resumed: dict[str, Any] | None = None) -> dict[str, Any]:
        """Train one stage to its token budget (loop.run_stage); returns its summary."""
        recipe, info = self.recipe, self.info
        recall = (RecallRows(recipe.data.recall_fraction, recipe.data.recall_min_gap, spec.seq_len,
                             seed=recipe.data.seed + stage) if recipe.data.recall_fraction else None)
        batches = PackedBatches(self.cache.train, spec.seq_len, spec.batch_size, seed=recipe.data.seed + stage,
                                rank=info.rank, world_size=info.world_size, recall=recall)
        layers_ac = self.layer_checkpointing(stage, spec)
        apply_activation_checkpointing(self.student.model, layers_ac)
        self.student.train()
        taps = TeacherTaps(self.teacher) if stage == 1 else None
        recompute = recipe.train.activation_checkpointing != "off"
        try:
            step_fn = make_step_fn(stage, spec, self.student, self.teacher, taps,
                                   autocast_for(recipe.train.precision, info.device), recompute=recompute)
            head_recomputed = (spec.loss == "ce" or info.enabled) and (
                not info.enabled or fsdp_recomputes_chunked_head())
            flops = FlopModel.from_models(self.teacher, self.student).step_flops(
                stage, spec.seq_len, spec.loss, lora=stage >= 3 and spec.lora_rank > 0, recompute_layers=layers_ac,
                recompute_head=head_recomputed, recompute_mixers=info.enabled and recompute,
                stage1_student_forward=info.enabled)
            summary = run_stage(stage, spec, params, step_fn, batches, info, self.logger,
                                lambda payload: self.checkpoint(stage, payload,
                                                                tag=f"stage{stage}-step{payload['step']:08d}"),
                                recipe.train.checkpoint_every, resumed, STAGE_NAMES[stage],
                                flops_per_token=flops["total"], checkpoint_minutes=recipe.train.checkpoint_minutes)
        finally:
            if taps is not None:
                taps.remove()
        self.student.eval()
        return {**summary, "name": STAGE_NAMES[stage], "seq_len": spec.seq_len}

    def evaluate(self, stage: int) -> None:
        """Held-out quality after the stage at the common context (with the window baseline)."""
        if self.windows is not None and self.job.evaluate:
            self.state.evals[f"stage{stage}"] = _quality(self.teacher, self.student, self.windows, self.info)

    def guard_before(self, stage: int, spec: Any, mid_stage: bool) -> StageGuard | None:
        """The guard's view of the model a stage starts from (train/guard.py): its quality at the stage's own
        context and, with train.keep=best, its weights (gone when the stage is resumed mid-way)."""
        if not self.guard_on:
            return None
        assert self.windows is not None
        windows = _stage_windows(self.cache.heldout, spec.seq_len, self.recipe, self.windows)
        entry = self.state.guard.setdefault(f"stage{stage}", {"seq_len": int(windows.shape[1]),
                                                              "starts_from": self.state.kept})
        if "before" not in entry:  # a resumed stage keeps the judgement of the model it started from
            entry["before"] = _quality(self.teacher, self.student, windows, self.info, baseline=False)
        saved = snapshot(self.student) if self.recipe.train.keep == "best" and not mid_stage else None
        return StageGuard(windows, saved)

    def guard_stage(self, stage: int, guard: StageGuard) -> None:
        """Judge the stage, before against after at its own context; undo it when it made the student worse
        (train.keep=best), or warn."""
        key = f"stage{stage}"
        entry = self.state.guard[key]
        entry["after"] = (self.state.evals[key] if guard.windows is self.windows
                          else _quality(self.teacher, self.student, guard.windows, self.info, baseline=False))
        verdict = from_rank0(judge(entry["before"]["student"], entry["after"]["student"],
                                   GuardTolerance(self.recipe.train.guard_kl_tolerance,
                                                  self.recipe.train.guard_top1_tolerance)), self.info)
        undo, action = decide(stage, verdict, self.recipe.train.keep, guard.saved is not None)
        if undo:
            assert guard.saved is not None
            restore(self.student, guard.saved)
            self.state.kept = entry["starts_from"]
            action = f"undone: the weights from before it are kept (train.keep=best, {self.state.kept})"
        entry.update(verdict, action=action, message=describe(stage, entry["seq_len"], verdict, action))
        if verdict["regressed"]:
            self.say(f"warning: {entry['message']}", logging.WARNING)
        else:
            log.info("stage guard: %s", entry["message"])

    def choose_hybrid(self) -> None:
        """After stage 1: the layers to keep as attention (greedy on held-out KL); the student is rebuilt."""
        if self.windows is None:
            raise QwerkyError("student.keep_attention=auto:K ranks layers on held-out text: pass --heldout "
                              "or more --data (and leave evaluation on)")
        assert self.keep_k is not None
        hybrid = choose_hybrid(self.teacher, self.student, self.windows, self.keep_k, self.recipe.train.seed)
        self.state.hybrid = hybrid
        self.student = rebuild_as_hybrid(self.student, self.teacher, self.recipe.student.convert_kwargs(),
                                         hybrid["layers"])
        self.owns = "mixers"
        self.unshare(1)
        log.info("hybrid: layers %s keep the teacher's attention (greedy steps %s; one-at-a-time costs %s)",
                 hybrid["layers"], [(g["added"], round(g["kl"], 4)) for g in hybrid["greedy"]],
                 [round(c, 4) for c in hybrid["costs"]])
        self.say(f"hybrid: keeping layers {hybrid['layers']} as attention (chosen greedily on held-out KL after "
                 "stage 1)")

    # --- checkpoint ----------------------------------------------------------------------------------------

    def checkpoint_payload(self, stage: int, stage_state: dict[str, Any] | None,
                           model: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The one checkpoint format: the stage to continue (with the loop's state when mid-stage), the weights,
        the recipe (resume checks it) and the run state."""
        return {"stage": stage, "stage_state": stage_state, "model": model, "recipe": self.recipe.to_dict(),
                **self.state.to_payload()}

    def checkpoint(self, stage: int, stage_state: dict[str, Any] | None, tag: str) -> None:
        """Write a checkpoint (rank 0; gathering the weights is a collective under FSDP2): the weights of
        `stored_keys` only, not the frozen teacher's. A stage boundary (no `stage_state`) is pinned: it survives
        rotation until the next one, so a diverged stage can start again from it."""
        model = full_state_dict(self.student, self.info, self.stored_keys())  # frozen weights not even copied
        if self.info.is_main:
            self.ckpt.save(self.checkpoint_payload(stage, stage_state, model), tag=tag, pin=stage_state is None)
        barrier(self.info)

    # --- finish --------------------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Export the student (LoRA merged) with report.json / report.md; returns the report (rank 0)."""
        final_state = full_state_dict(self.student, self.info) if self.info.enabled else None  # every rank
        report: dict[str, Any] = {}
        if self.info.is_main:
            model = self.export_model(final_state)
            report = self.report()
            md = render_report_md(report)
            save_student(model, self.tokenizer, self.job.out, extra_files={"report.json": report, "report.md": md})
            atomic_write_json(self.run_dir / "report.json", report)
            atomic_write_bytes(self.run_dir / "report.md", md.encode())
        barrier(self.info)
        return report

    def export_model(self, final_state: dict[str, torch.Tensor] | None) -> torch.nn.Module:
        """The model to save: the student itself, or under FSDP2 an unsharded one holding the gathered weights."""
        model = self.student
        if self.info.enabled:
            assert final_state is not None
            model = convert_teacher(load_teacher(self.job.teacher), **self.recipe.student.convert_kwargs())
            unshare_from_teacher(model, self.teacher)
            model.load_state_dict(final_state)
        if any("lora_" in n for n, _ in model.named_parameters()):
            merge_lora(model)
        return model

    def report(self) -> dict[str, Any]:
        recipe, state, cache, windows, info = self.recipe, self.state, self.cache, self.windows, self.info
        tolerance = GuardTolerance(recipe.train.guard_kl_tolerance, recipe.train.guard_top1_tolerance)
        last = f"stage{self.training[-1]}" if self.training else "stage0"
        return {
            "teacher": str(self.job.teacher), "out": str(self.job.out), "recipe": recipe.to_dict(),
            "stages": state.summaries, "quality": state.evals.get(state.kept if self.guard_on else last),
            "quality_by_stage": state.evals, "teacher_context": self.teacher_context, "hybrid": state.hybrid,
            "guard": {"keep": recipe.train.keep, "kept": state.kept if self.guard_on else None,
                      "tolerance": {"kl_relative": tolerance.kl_relative, "top1_points": tolerance.top1_points},
                      "stages": state.guard},
            "data": {"train_tokens": int(len(cache.train)) if cache is not None else 0,
                     "heldout_tokens": int(len(cache.heldout)) if cache is not None else 0,
                     "eval_windows": int(windows.shape[0]) if windows is not None else 0,
                     "eval_seq_len": recipe.data.eval_seq_len},
            "wall_s": round(time.perf_counter() - self.t_start, 1),
            "parallel": {"fsdp2": info.enabled, "world_size": info.world_size, "forced": info.forced,
                         "device": str(info.device)},
        }


# --- helpers of the phases ---------------------------------------------------------------------------------


def _recipe_changes(saved: dict[str, Any], now: dict[str, Any], stage: int, started: bool) -> list[str]:
    """The recipe sections that differ from the checkpointed run's and may not: any but the stages the run has
    not begun (from `stage` on, or after it once `started`), e.g. a lower lr for a stage that diverged."""
    free = {f"stage{s}" for s in range(stage + int(started), 5)}
    return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in free)


def _first_rows(cache: Any, rows: int, seq_len: int) -> torch.Tensor | None:
    """The first `rows` x (at most `seq_len`) tokens of the training text, [rows, T]; None when T < 2."""
    row_len = min(seq_len, len(cache.train) // rows)
    if row_len < 2:
        return None
    return torch.from_numpy(np.asarray(cache.train[: rows * row_len]).astype(np.int64)).view(rows, row_len)


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
                            say: Callable[[str, int], None] | None = None) -> Any:
    """The stage's spec; warned about (through `say`, else the log) and with train.teacher_context=cap
    shortened, when it trains past the teacher's effective context. The recipe itself is left as written (resume
    compares it)."""
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
    if say is not None:
        say(f"warning: {message}", logging.WARNING)
    else:
        log.warning("%s", message)
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
    sample = _first_rows(cache, rows, seq_len)
    if sample is None:
        return
    t0 = time.perf_counter()
    report = fit_output_scales(student, teacher, sample)
    if not report:
        return
    before = [r["rel_error_before"] for r in report.values()]
    after = [r["rel_error_after"] for r in report.values()]
    log.info("stage 0: per-head output scales fitted to the teacher's attention on %d x %d tokens in %.0f s: "
             "relative error per layer %.2f-%.2f before, %.2f-%.2f after", *sample.shape,
             time.perf_counter() - t0, min(before), max(before), min(after), max(after))


def _quality(teacher: torch.nn.Module, student: torch.nn.Module, windows: torch.Tensor, info: DistInfo,
             baseline: bool = True) -> dict[str, Any]:
    from qwerky.eval.models import window_baseline
    from qwerky.eval.quality import compare_models

    was_training = student.training
    student.eval()
    base = window_baseline(teacher) if baseline and not info.enabled else None  # its zero-gated branch not run
    with torch.no_grad():
        result = compare_models(teacher, student, windows.to(info.device), baseline=base)
    if info.enabled:
        reshard(teacher, student)
    student.train(was_training)
    return result


def load_report(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
