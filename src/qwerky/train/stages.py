"""What each distillation stage trains and which loss it minimises.

1: each mixer alone against its own teacher attention output, fed the teacher's input (all layers in
   one pass, no error accumulates: each mixer hands the teacher's attention output on down the residual
   stream, so every layer's input is exactly the teacher's); 2: whole model on teacher logits, mixers only;
3: all layers (or mixers + LoRA on the MLPs); 4: all layers at a longer context, KL or plain cross-entropy.

Stage 1's cost and memory. The teacher's forward (hooked) records each converted layer's attention input and
output; each mixer is then called on its layer's recorded input directly, so the student's MLPs, norms and
kept attention layers never run (they would only recompute the teacher's stream) and the LM head is never
computed. `make_step_fn` runs each mixer's backward right after its forward, so only one mixer's activations
live at a time and nothing is recomputed; `make_loss_fn` (one loss tensor, one graph) recomputes each mixer
in backward instead (activation checkpointing). Under FSDP2 the mixers are called from the student's own
forward (`AlignmentTap`: each FSDP unit runs under its root), checkpointed the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint

from qwerky.modeling.layers_common import finalize_logits
from qwerky.modeling.mixer_attention import AttentionMixer
from qwerky.surgery.families import inspect_teacher

from .alignment import AlignmentTap, call_mixer, checkpoint_forward
from .losses import alignment_loss, chunked_ce, chunked_kl
from .parallel import fsdp_recomputes_chunked_head
from .recipe import StageSpec

STAGE_NAMES = {1: "attention alignment", 2: "logit distillation (mixers)", 3: "logit distillation (all layers)",
               4: "long context"}


def recurrent_mixers(student: nn.Module) -> list[nn.Module]:
    return [m for m in student.mixers if not isinstance(m, AttentionMixer)]


def trainable_parameters(stage: int, student: nn.Module, spec: StageSpec) -> list[nn.Parameter]:
    """Set requires_grad for this stage and return the trainable parameters (unique)."""
    student.requires_grad_(False)
    if stage in (1, 2):
        for m in recurrent_mixers(student):
            m.requires_grad_(True)
    elif spec.lora_rank > 0:
        for m in student.mixers:
            m.requires_grad_(True)
        for name, p in student.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
    else:
        student.requires_grad_(True)
    seen: set[int] = set()
    params = []
    for p in student.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


class TeacherTaps:
    """Forward hooks on the teacher's attention modules: their inputs, RoPE and outputs (stage 1 targets).

    `layers` (default all) limits which layers are recorded and `inputs=False` drops the inputs: stage 1
    keeps only what its path reads. Records stay until `records.clear()` (or are popped as they are used)."""

    def __init__(self, teacher: nn.Module, layers: Iterable[int] | None = None, inputs: bool = True) -> None:
        layout = inspect_teacher(teacher)
        self.records: dict[int, tuple[torch.Tensor | None, Any, torch.Tensor]] = {}
        self.layers = None if layers is None else set(layers)
        self.inputs = inputs
        self.handles = []
        for i, layer in enumerate(layout.layers):
            attn = getattr(layer, layout.attention_name)
            self.handles.append(attn.register_forward_hook(self._hook(i), with_kwargs=True))

    def _hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self.layers is not None and i not in self.layers:
                return
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            out = output[0] if isinstance(output, tuple) else output
            self.records[i] = (hidden.detach() if self.inputs else None, kwargs.get("position_embeddings"),
                               out.detach())
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def teacher_base(teacher: nn.Module) -> nn.Module:
    return getattr(teacher, teacher.base_model_prefix)


def _sharded(student: nn.Module) -> bool:
    return isinstance(student.lm_head, FSDPModule) or any(isinstance(m, FSDPModule) for m in student.mixers)


class Stage1:
    """Stage 1 on one micro-batch: the teacher's forward records each converted layer's attention input and
    output, then each mixer runs on its recorded input against its recorded output (see the module docstring).

    Every mixer's input is exactly the teacher's, so no error accumulates. The one link between mixers is
    the RWKV-7 value residual: the first converted layer's values (`ctx.v_first`) feed every later mixer,
    and gradients flow back to that layer through them."""

    def __init__(self, student: nn.Module, teacher: nn.Module, taps: TeacherTaps, recompute: bool = True) -> None:
        self.student, self.teacher, self.taps = student, teacher, taps
        self.mixers = recurrent_mixers(student)
        if not self.mixers:
            raise RuntimeError("stage 1: the student has no converted layer to align")
        self.sharded = _sharded(student)
        self.recompute = recompute
        taps.layers = {m.layer_idx for m in self.mixers}
        taps.inputs = not self.sharded  # the sharded path reads the teacher's stream from the student's forward

    def _teacher(self, ids: torch.Tensor) -> None:
        self.taps.records.clear()
        with torch.no_grad():
            teacher_base(self.teacher)(input_ids=ids, use_cache=False)
        missing = [m.layer_idx for m in self.mixers if m.layer_idx not in self.taps.records]
        if missing:
            raise RuntimeError(f"stage 1: no teacher attention output recorded for layers {missing}")

    def _context(self, ids: torch.Tensor) -> None:
        """The forward context of a parallel pass from an empty state, as `hidden_states` sets it."""
        ctx = self.student.ctx
        B, T = ids.shape
        ctx.state, ctx.token_mask, ctx.v_first = None, None, None
        ctx.positions = torch.arange(T, device=ids.device).expand(B, T)

    def _release(self) -> None:
        ctx = self.student.ctx
        ctx.positions, ctx.v_first = None, None
        self.taps.records.clear()

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """The mean alignment loss as one tensor (one graph; mixers recomputed in backward if `recompute`)."""
        self._teacher(ids)
        n = len(self.mixers)
        if self.sharded:
            targets = {i: rec[2] for i, rec in self.taps.records.items()}
            with contextlib.ExitStack() as stack:
                if self.recompute:
                    stack.enter_context(checkpoint_forward(self.mixers))
                pairs = stack.enter_context(AlignmentTap(self.mixers).feeding(targets))
                self.student.hidden_states(ids)  # every layer is fed the teacher's stream (see AlignmentTap)
            self.taps.records.clear()
            return sum(alignment_loss(y, target) for y, target in pairs) / n
        self._context(ids)
        total, v_first = 0.0, None
        try:
            for m in self.mixers:
                x, rope, target = self.taps.records.pop(m.layer_idx)
                if self.recompute and torch.is_grad_enabled():
                    y, v_first = checkpoint(call_mixer, m, m, x, rope, v_first, use_reentrant=False)
                else:
                    y, v_first = call_mixer(m, m, x, rope, v_first)
                total = total + alignment_loss(y, target)
        finally:
            self._release()
        return total / n

    def step(self, ids: torch.Tensor, weight: float,
             autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
        """Forward and backward of `weight` x the loss, one mixer at a time: each mixer's backward runs as soon
        as its loss is known, so only one mixer's activations are alive and none is recomputed. The mixer
        that sets the value-residual source is the exception: its backward waits for the gradient that the
        later mixers send to that source. Returns the weighted loss (detached)."""
        if self.sharded:
            with autocast or contextlib.nullcontext():
                loss = self.loss(ids) * weight
            loss.backward()
            return loss.detach()
        with autocast or contextlib.nullcontext():
            self._teacher(ids)
        self._context(ids)
        scale = weight / len(self.mixers)
        total = torch.zeros((), device=ids.device)
        deferred: list[torch.Tensor] = []  # losses of the mixers that produced a value-residual source
        sources: list[tuple[torch.Tensor, torch.Tensor]] = []  # (source in its graph, the leaf others read)
        v_first = None
        try:
            for m in self.mixers:
                x, rope, target = self.taps.records.pop(m.layer_idx)
                with autocast or contextlib.nullcontext():
                    y, v_out = call_mixer(m, m, x, rope, v_first)
                    loss = alignment_loss(y, target) * scale
                total += loss.detach().float()
                if v_out is not None and v_out is not v_first and v_out.requires_grad:
                    v_first = v_out.detach().requires_grad_(True)
                    sources.append((v_out, v_first))
                    deferred.append(loss)
                else:
                    v_first = v_out
                    loss.backward()
                del y, loss
            tensors = deferred + [src for src, leaf in sources if leaf.grad is not None]
            grads = [None] * len(deferred) + [leaf.grad for _, leaf in sources if leaf.grad is not None]
            if tensors:
                torch.autograd.backward(tensors, grads)
        finally:
            self._release()
        return total


def make_loss_fn(stage: int, spec: StageSpec, student: nn.Module, teacher: nn.Module,
                 taps: TeacherTaps | None, recompute: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """Loss of one micro-batch [b, T] of token ids for this stage (one tensor; call backward on it).
    `recompute`: stage 1 recomputes each mixer in backward (bounded memory)."""
    if stage == 1:
        assert taps is not None
        return Stage1(student, teacher, taps, recompute=recompute).loss
    t_base = teacher_base(teacher)
    t_lm_head = teacher.get_output_embeddings()

    def t_head(hidden: torch.Tensor) -> torch.Tensor:
        return finalize_logits(teacher.config, t_lm_head(hidden))

    s_head = student.logits
    sharded = isinstance(student.lm_head, FSDPModule)
    recompute_head = not sharded or fsdp_recomputes_chunked_head()

    def distill(ids: torch.Tensor) -> torch.Tensor:
        s_hidden = student.hidden_states(ids)
        if spec.loss == "ce":
            return chunked_ce(s_hidden, ids, s_head, spec.logits_chunk, recompute_head)
        with torch.no_grad():
            t_hidden = t_base(input_ids=ids, use_cache=False).last_hidden_state
        # unsharded: each chunk's gradient in the forward pass (the head runs once, no logits kept)
        head_params = None if sharded else [p for p in student.lm_head.parameters() if p.requires_grad]
        return chunked_kl(s_hidden, t_hidden, s_head, t_head, spec.logits_chunk, recompute_head, head_params)
    return distill


StepFn = Callable[[torch.Tensor, float], torch.Tensor]


def make_step_fn(stage: int, spec: StageSpec, student: nn.Module, teacher: nn.Module, taps: TeacherTaps | None,
                 autocast: contextlib.AbstractContextManager | None = None, recompute: bool = True) -> StepFn:
    """What the training loop calls per micro-batch: `step(ids, weight)` runs forward and backward of
    weight x the stage's loss (gradients accumulate) and returns that weighted loss, detached. Stage 1
    (unsharded) interleaves the mixers' backward with their forward (`Stage1.step`)."""
    if stage == 1:
        assert taps is not None
        aligner = Stage1(student, teacher, taps, recompute=recompute)
        return lambda ids, weight: aligner.step(ids, weight, autocast)
    loss_fn = make_loss_fn(stage, spec, student, teacher, taps)

    def step(ids: torch.Tensor, weight: float) -> torch.Tensor:
        with autocast or contextlib.nullcontext():
            loss = loss_fn(ids) * weight
        loss.backward()
        return loss.detach()
    return step


def add_mlp_lora(student: nn.Module, rank: int) -> int:
    """Stage 3 option: LoRA adapters (peft) on every MLP projection; returns how many layers got one."""
    from peft import LoraConfig, inject_adapter_in_model

    names = {n.rsplit(".", 1)[-1] for n, m in student.named_modules()
             if isinstance(m, nn.Linear) and ".mlp." in f".{n}."}
    if not names:
        raise ValueError("stage3.lora_rank > 0 but the teacher has no '.mlp.' linear layers to adapt")
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(names), lora_dropout=0.0)
    inject_adapter_in_model(cfg, student.model)
    return sum(1 for n, _ in student.named_modules() if n.endswith("lora_A"))


def merge_lora(student: nn.Module) -> None:
    """Fold LoRA adapters into their base weights and remove them (the exported model has none)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(student.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, attr = name.rpartition(".")
            parent = student.get_submodule(parent_name)
            setattr(parent, attr, module.get_base_layer())
