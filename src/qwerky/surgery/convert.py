"""Stage 0: teacher -> student by weight transfer (no training).

Every attention module becomes a mixer built around the teacher's own projection modules
(q->receptance, k->key, v->value, o->output, biases and q/k norms kept); GQA key/value heads keep their
shapes and are repeated to the query heads at run time. Every other tensor (embeddings, MLPs, norms,
head, rotary buffers) is the teacher's own tensor, shared, not copied: a 72B conversion does not need
two copies in memory. Training stages that update shared weights must unshare them first
(`qwerky.train` does, so the frozen teacher stays intact).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from qwerky.modeling.configuration_qwerky import QwerkyConfig
from qwerky.modeling.mixer_base import get_mixer
from qwerky.modeling.modeling_qwerky import QwerkyForCausalLM

from .families import PROJECTIONS, TeacherLayout, UnsupportedArchitectureError, inspect_teacher

log = logging.getLogger(__name__)


def student_config(teacher: nn.Module, layout: TeacherLayout, mixer: str = "rwkv7",
                   attention_layers: Sequence[int] = (), mixer_options: Mapping[str, Any] | None = None,
                   **overrides: object) -> QwerkyConfig:
    """The student's config; the mixer's options are validated by its own Options and stored complete."""
    cls = get_mixer(mixer)
    options = cls.Options.parse(mixer_options, where=f"{mixer} mixer_options")
    n = teacher.config.num_hidden_layers
    bad = [i for i in attention_layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"attention_layers {bad} out of range: the teacher has layers 0..{n - 1}")
    teacher_config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    return QwerkyConfig(
        teacher_config=teacher_config, mixer=mixer, mixer_options=options.to_dict(),
        attention_layers=list(attention_layers), attention_name=layout.attention_name, num_heads=layout.num_heads,
        num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, attention_scaling=layout.scaling,
        use_rope=layout.has_rope and cls.uses_rope, has_qk_norm=layout.has_qk_norm,
        lm_head_bias=getattr(teacher.get_output_embeddings(), "bias", None) is not None, **overrides,
    )


def _student_name(name: str, layout: TeacherLayout, attention_layers: set[int]) -> str:
    """Map a teacher parameter/buffer name to the student's."""
    parts = name.split(".")
    if parts[0] == layout.base_prefix:
        parts[0] = "model"
    attn = layout.attention_name
    if attn in parts:
        i = parts.index(attn)
        layer_idx = next((int(p) for p in reversed(parts[:i]) if p.isdigit()), -1)
        if i + 1 < len(parts) and parts[i + 1] in PROJECTIONS:
            if layer_idx in attention_layers:
                parts[i + 1] = "o_proj" if parts[i + 1] == "dense" else parts[i + 1]
            else:
                parts[i + 1] = PROJECTIONS[parts[i + 1]]
    return ".".join(parts)


def _set_tensor(root: nn.Module, name: str, tensor: torch.Tensor, is_param: bool) -> None:
    module_name, _, attr = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    if is_param:
        setattr(module, attr, nn.Parameter(tensor, requires_grad=tensor.requires_grad or tensor.is_floating_point()))
    else:
        module._buffers[attr] = tensor


def convert_teacher(teacher: nn.Module, mixer: str = "rwkv7", attention_layers: Sequence[int] = (),
                    mixer_options: Mapping[str, Any] | None = None, **config_overrides: object) -> QwerkyForCausalLM:
    """Build the student from a loaded HF causal LM teacher (stage 0). The teacher is left unchanged.

    New parameters are filled with NaN before the mixers' `reset_new_parameters` sets them, so a parameter
    a mixer forgets to initialise shows at once (a NaN output), not as a silently random start."""
    layout = inspect_teacher(teacher)
    config = student_config(teacher, layout, mixer, attention_layers, mixer_options, **config_overrides)
    with torch.device("meta"):
        student = QwerkyForCausalLM(config)
    keep = set(config.attention_layers)
    teacher_tensors: dict[str, tuple[torch.Tensor, bool]] = {}
    for name, p in teacher.named_parameters(remove_duplicate=False):
        teacher_tensors[_student_name(name, layout, keep)] = (p.data, True)
    for name, b in teacher.named_buffers(remove_duplicate=False):
        teacher_tensors[_student_name(name, layout, keep)] = (b, False)
    ref = next(teacher.parameters())
    student_params = dict(student.named_parameters(remove_duplicate=False))
    student_buffers = dict(student.named_buffers(remove_duplicate=False))
    unused = set(teacher_tensors) - set(student_params) - set(student_buffers)
    if unused:
        raise UnsupportedArchitectureError(
            f"unsupported architecture '{layout.model_type}': teacher tensors with no place in the student: "
            f"{sorted(unused)[:5]}")
    new_params = []
    for name, p in student_params.items():
        if name in teacher_tensors:
            t, _ = teacher_tensors[name]
            if t.shape != p.shape:
                raise UnsupportedArchitectureError(
                    f"shape mismatch for {name}: teacher {tuple(t.shape)} vs student {tuple(p.shape)}")
            _set_tensor(student, name, t, True)
        else:
            new_params.append(name)
            _set_tensor(student, name, torch.full(p.shape, float("nan"), dtype=ref.dtype, device=ref.device), True)
    for name in student_buffers:
        if name in teacher_tensors:
            _set_tensor(student, name, teacher_tensors[name][0], False)
        else:
            raise UnsupportedArchitectureError(f"student buffer {name} has no teacher counterpart")
    for m in student.mixers:
        m.reset_new_parameters()
    if config.tie_word_embeddings:
        student.tie_weights()
    student.eval()
    log.info("converted %s: %d layers -> %s (%d new parameter tensors)", layout.model_type,
             len(layout.layers), mixer, len(new_params))
    return student


def unshare_from_teacher(student: nn.Module, teacher: nn.Module, modules: Sequence[nn.Module] | None = None) -> int:
    """Give the student private copies of the tensors it shares with the teacher (within `modules`, default
    all of it), so that training them leaves the frozen teacher intact; returns how many were copied."""
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    count = 0
    for root in modules if modules is not None else [student]:
        for module in root.modules():
            for attr, p in list(module._parameters.items()):
                if p is not None and p.data_ptr() in teacher_ptrs:
                    module._parameters[attr] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                    count += 1
    if getattr(student.config, "tie_word_embeddings", False):
        student.tie_weights()
    return count
