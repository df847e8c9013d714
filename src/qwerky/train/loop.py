"""The training loop of one stage: batches -> loss -> AdamW step, with progress, logs and checkpoints."""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qwerky.data import PackedBatches
from qwerky.errors import QwerkyError

from .checkpoint import atomic_write_bytes
from .parallel import DistInfo, all_reduce_mean, from_rank0
from .recipe import StageSpec


def lr_lambda(spec: StageSpec, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine from lr to min_lr (or constant)."""
    floor = spec.min_lr / spec.lr

    def f(step: int) -> float:
        if spec.warmup_steps and step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        if spec.schedule == "constant":
            return 1.0
        span = max(1, total_steps - spec.warmup_steps)
        progress = min(1.0, (step - spec.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


class JsonlLog:
    """Append-only JSONL step log (rank 0), optionally mirrored to tensorboard."""

    def __init__(self, path: Path, enabled: bool, tensorboard_dir: Path | None = None) -> None:
        self.path, self.enabled = path, enabled
        self.tb = None
        if enabled and tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                self.tb = None

    def resume_at(self, stage: int, step: int, record: dict[str, Any]) -> dict[str, Any]:
        """On resume (or a fresh start under --resume): drop what the killed run logged after the point it resumes
        from (stage, step), so no step is logged twice and the log stays valid JSONL (a line cut by the kill
        goes too), then append `record` (an {"event": "resumed", ...}) with what was dropped: how many records
        and the seconds of step work they stood for (to be done again). Returns the record as written."""
        kept, dropped = [], []
        if self.enabled and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                (dropped if (rec.get("stage") or 0, rec.get("step") or 0) > (stage, step) else kept).append(line)
        steps = [json.loads(x) for x in dropped]
        record = {**record, "dropped_records": len(dropped),
                  "redone_s": round(sum(r.get("step_s", 0.0) for r in steps if "event" not in r), 3)}
        if self.enabled:
            lines = [*kept, json.dumps(_finite_or_null(record), allow_nan=False)]
            atomic_write_bytes(self.path, "".join(x + "\n" for x in lines).encode())
        return record

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:  # strict JSON: a NaN/inf number is written as null
            f.write(json.dumps(_finite_or_null(record), allow_nan=False) + "\n")
        if self.tb is not None and record.get("loss") is not None:
            self.tb.add_scalar(f"stage{record['stage']}/loss", record["loss"], record["tokens"])
            self.tb.add_scalar(f"stage{record['stage']}/lr", record["lr"], record["tokens"])


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc `malloc_trim`). Without it the memory an earlier
    phase freed (the stage-0 fit, the previous stage's activations and optimiser) stays resident, and the
    next stage's peak RSS adds its own on top: SmolLM2-135M stage 2 started at 3.8 GiB resident with 1.2
    GiB of live weights."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux: /proc/self/clear_refs), so the next
    `peak_rss_bytes` is the peak since now. False where that is not possible (then: since process start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(field: str = "VmHWM") -> int:
    """Peak resident memory of this process (since the last `peak_rss_reset`, or since it started);
    `field="VmRSS"`: the resident memory now."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


MAX_NONFINITE_RUN = 8  # this many non-finite steps in a row (or any at the stage's end) stop it with an error


class NonFiniteTraining(QwerkyError):
    """Training diverged: a run of steps whose loss or gradient was NaN/inf (none of them was applied)."""


def run_stage(
    stage: int, spec: StageSpec, params: list[nn.Parameter], step_fn: Callable[[torch.Tensor, float], torch.Tensor],
    batches: PackedBatches, info: DistInfo, log: JsonlLog, save_checkpoint: Callable[[dict[str, Any]], None],
    checkpoint_every: int, resume: dict[str, Any] | None = None, description: str = "",
    flops_per_token: float = 0.0, checkpoint_minutes: float = 0.0,
) -> dict[str, Any]:
    """Train one stage to its token budget; returns a summary (steps, tokens, wall and CPU time, tokens/s,
    achieved FLOP/s, peak memory, final loss).

    `step_fn(ids, weight)` runs forward and backward of one micro-batch's loss times weight (stages.make_step_fn).
    `flops_per_token` (train/flops.py, what a step executes per training token) turns tokens/s into achieved
    FLOP/s; every log line carries both, cumulative over the stage."""
    total_steps = max(1, math.ceil(spec.tokens / batches.tokens_per_batch))
    optimizer = torch.optim.AdamW(params, lr=spec.lr, betas=(spec.beta1, spec.beta2),
                                  eps=spec.eps, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec, total_steps))
    step, elapsed, cpu, last_loss = 0, 0.0, 0.0, float("nan")
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        batches.load_state_dict(resume["batches"])
        set_rng_state(resume["rng"])
        step, elapsed, last_loss = resume["step"], resume["elapsed"], resume.get("loss", float("nan"))
        cpu = resume.get("cpu", 0.0)

    def payload() -> dict[str, Any]:
        return {"step": step, "elapsed": elapsed, "cpu": cpu, "loss": last_loss, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "batches": batches.state_dict(), "rng": rng_state()}

    local_b = batches.local_batch_size
    micro = spec.micro_batch_size or local_b
    threads = torch.get_num_threads()
    it = iter(batches)
    bar = tqdm(total=total_steps, initial=step, disable=not info.is_main, unit="step",
               desc=f"stage {stage} {description}".strip(), dynamic_ncols=True)
    release_free_memory()
    peak_rss_reset()
    rss_start = peak_rss_bytes("VmRSS")
    t0, c0 = time.perf_counter() - elapsed, time.process_time() - cpu
    first = True
    nonfinite_steps = nonfinite_run = 0
    last_save = time.perf_counter()
    while step < total_steps:
        t_step = time.perf_counter()
        batch = next(it).to(info.device)
        loss_sum = torch.zeros((), device=info.device)
        for piece in batch.split(micro):
            loss_sum += step_fn(piece, piece.shape[0] / local_b).float()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, spec.grad_clip if spec.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        finite = bool(all_reduce_mean(torch.isfinite(loss_sum + grad_norm).float(), info) == 1.0)  # every rank
        if finite:
            optimizer.step()
            nonfinite_run = 0
        else:  # a NaN/inf loss or gradient never reaches the weights: the step is skipped, counted and logged
            nonfinite_steps += 1
            nonfinite_run += 1
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        last_loss = float(all_reduce_mean(loss_sum, info))
        if nonfinite_run >= MAX_NONFINITE_RUN or (nonfinite_run and step == total_steps):
            bar.close()
            raise NonFiniteTraining(
                f"stage {stage}: the loss or its gradient was NaN/inf on {nonfinite_run} steps in a row (step "
                f"{step}; {nonfinite_steps} skipped in this stage); stopped before anything non-finite was saved. "
                f"Lower stage{stage}.lr (now {spec.lr:g}) or set stage{stage}.grad_clip, then rerun with --resume.")
        now = time.perf_counter()
        elapsed, cpu = now - t0, time.process_time() - c0
        tokens = step * batches.tokens_per_batch
        tok_s = tokens / max(elapsed, 1e-9)
        record = {"stage": stage, "step": step, "tokens": tokens, "loss": last_loss if finite else None,
                  "lr": scheduler.get_last_lr()[0], "time": round(elapsed, 3), "tok_s": round(tok_s, 1),
                  "step_s": round(now - t_step, 3), "cpu_s": round(cpu, 2)}
        if flops_per_token:
            record["gflop_s"] = round(tok_s * flops_per_token / 1e9, 2)
        if not finite:
            record.update(skipped="non-finite loss or gradient", nonfinite_steps=nonfinite_steps)
        if first:
            record.update(threads=threads, flops_per_token=round(flops_per_token))
            first = False
        log.write(record)
        bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tok_s:,.0f}",
                        **({"GFLOP_s": f"{record['gflop_s']:.1f}"} if flops_per_token else {}))
        bar.update(1)
        due = bool(checkpoint_every) and step % checkpoint_every == 0
        if checkpoint_minutes > 0 and not due:  # by time too: a kill loses minutes, not a whole slow stage
            due = from_rank0(time.perf_counter() - last_save >= 60 * checkpoint_minutes, info)
        if due and step < total_steps:
            save_checkpoint(payload())
            last_save = time.perf_counter()
    bar.close()
    tokens = step * batches.tokens_per_batch
    tok_s = tokens / max(elapsed, 1e-9)
    return {"stage": stage, "steps": step, "tokens": tokens, "wall_s": round(elapsed, 2),
            "final_loss": last_loss, "tokens_per_s": round(tok_s, 1), "cpu_s": round(cpu, 2), "threads": threads,
            "flops_per_token": round(flops_per_token), "gflop_s": round(tok_s * flops_per_token / 1e9, 2),
            "peak_rss_gib": round(peak_rss_bytes() / 2**30, 2), "rss_start_gib": round(rss_start / 2**30, 2),
            "micro_batch_size": micro, "nonfinite_steps": nonfinite_steps}
