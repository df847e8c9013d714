"""The training loop of one stage: batches -> loss -> AdamW step, with progress, logs and checkpoints."""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qwerky.data import PackedBatches

from .parallel import DistInfo, all_reduce_mean
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

    def truncate_after(self, stage: int, step: int) -> None:
        """On resume: drop lines the killed run wrote after its last checkpoint."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("stage", 0) > stage or (rec.get("stage") == stage and rec.get("step", 0) > step):
                continue
            keep.append(line)
        self.path.write_text("".join(k + "\n" for k in keep))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and "loss" in record:
            self.tb.add_scalar(f"stage{record['stage']}/loss", record["loss"], record["tokens"])
            self.tb.add_scalar(f"stage{record['stage']}/lr", record["lr"], record["tokens"])


def run_stage(
    stage: int, spec: StageSpec, params: list[nn.Parameter], loss_fn: Callable[[torch.Tensor], torch.Tensor],
    batches: PackedBatches, info: DistInfo, log: JsonlLog, save_checkpoint: Callable[[dict[str, Any]], None],
    checkpoint_every: int, autocast: contextlib.AbstractContextManager | None = None,
    resume: dict[str, Any] | None = None, description: str = "",
) -> dict[str, Any]:
    """Train one stage to its token budget; returns a summary (steps, tokens, wall time, final loss)."""
    total_steps = max(1, math.ceil(spec.tokens / batches.tokens_per_batch))
    optimizer = torch.optim.AdamW(params, lr=spec.lr, betas=(spec.beta1, spec.beta2),
                                  eps=spec.eps, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec, total_steps))
    step, elapsed, last_loss = 0, 0.0, float("nan")
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        batches.load_state_dict(resume["batches"])
        set_rng_state(resume["rng"])
        step, elapsed, last_loss = resume["step"], resume["elapsed"], resume.get("loss", float("nan"))
        log.truncate_after(stage, step)

    def payload() -> dict[str, Any]:
        return {"step": step, "elapsed": elapsed, "loss": last_loss, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "batches": batches.state_dict(), "rng": rng_state()}

    local_b = batches.local_batch_size
    micro = spec.micro_batch_size or local_b
    it = iter(batches)
    bar = tqdm(total=total_steps, initial=step, disable=not info.is_main, unit="step",
               desc=f"stage {stage} {description}".strip(), dynamic_ncols=True)
    t0 = time.perf_counter() - elapsed
    while step < total_steps:
        batch = next(it).to(info.device)
        loss_sum = torch.zeros((), device=info.device)
        for piece in batch.split(micro):
            with autocast or contextlib.nullcontext():
                loss = loss_fn(piece) * (piece.shape[0] / local_b)
            loss.backward()
            loss_sum += loss.detach().float()
        if spec.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        last_loss = float(all_reduce_mean(loss_sum, info))
        elapsed = time.perf_counter() - t0
        tokens = step * batches.tokens_per_batch
        tok_s = tokens / max(elapsed, 1e-9)
        log.write({"stage": stage, "step": step, "tokens": tokens, "loss": last_loss,
                   "lr": scheduler.get_last_lr()[0], "time": round(elapsed, 3), "tok_s": round(tok_s, 1)})
        bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tok_s:,.0f}")
        bar.update(1)
        if checkpoint_every and step % checkpoint_every == 0 and step < total_steps:
            save_checkpoint(payload())
    bar.close()
    return {"stage": stage, "steps": step, "tokens": step * batches.tokens_per_batch, "wall_s": round(elapsed, 2),
            "final_loss": last_loss, "tokens_per_s": round(step * batches.tokens_per_batch / max(elapsed, 1e-9), 1)}
