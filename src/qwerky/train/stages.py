"""What each distillation stage trains and which loss it minimises.

1: each mixer alone against its own teacher attention output, fed the teacher's input (all layers in
   one pass, no error accumulates: each mixer hands the teacher's attention output on down the residual
   stream, so every layer's input is exactly the teacher's); 2: whole model on teacher logits, mixers only;
3: all layers (or mixers + LoRA on the MLPs); 4: all layers at a longer context, KL or plain cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from qwerky.modeling.layers_common import finalize_logits
from qwerky.modeling.mixer_attention import AttentionMixer
from qwerky.surgery.families import inspect_teacher

from .alignment import AlignmentTap
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
    """Forward hooks on the teacher's attention modules: their inputs, RoPE and outputs (stage 1 targets)."""

    def __init__(self, teacher: nn.Module) -> None:
        layout = inspect_teacher(teacher)
        self.records: dict[int, tuple[torch.Tensor, Any, torch.Tensor]] = {}
        self.handles = []
        for i, layer in enumerate(layout.layers):
            attn = getattr(layer, layout.attention_name)
            self.handles.append(attn.register_forward_hook(self._hook(i), with_kwargs=True))

    def _hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            out = output[0] if isinstance(output, tuple) else output
            self.records[i] = (hidden.detach(), kwargs.get("position_embeddings"), out.detach())
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def teacher_base(teacher: nn.Module) -> nn.Module:
    return getattr(teacher, teacher.base_model_prefix)


def make_loss_fn(stage: int, spec: StageSpec, student: nn.Module, teacher: nn.Module,
                 taps: TeacherTaps | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Loss of one micro-batch [b, T] of token ids for this stage."""
    t_base = teacher_base(teacher)
    t_lm_head = teacher.get_output_embeddings()

    def t_head(hidden: torch.Tensor) -> torch.Tensor:
        return finalize_logits(teacher.config, t_lm_head(hidden))

    s_head = student.logits

    if stage == 1:
        assert taps is not None
        tap = AlignmentTap(recurrent_mixers(student))

        def align(ids: torch.Tensor) -> torch.Tensor:
            taps.records.clear()
            with torch.no_grad():
                t_base(input_ids=ids, use_cache=False)
            with tap.feeding({i: rec[2] for i, rec in taps.records.items()}) as pairs:
                student.hidden_states(ids)  # every layer is fed the teacher's stream (see AlignmentTap)
            return sum(alignment_loss(y, target) for y, target in pairs) / len(pairs)
        return align

    recompute = not isinstance(student.lm_head, FSDPModule) or fsdp_recomputes_chunked_head()

    def distill(ids: torch.Tensor) -> torch.Tensor:
        s_hidden = student.hidden_states(ids)
        if spec.loss == "ce":
            return chunked_ce(s_hidden, ids, s_head, spec.logits_chunk, recompute)
        with torch.no_grad():
            t_hidden = t_base(input_ids=ids, use_cache=False).last_hidden_state
        return chunked_kl(s_hidden, t_hidden, s_head, t_head, spec.logits_chunk, recompute)
    return distill


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
