"""Recognise a teacher's decoder layout: where its decoder layers and attention projections live.

qwerky supports any HF decoder causal LM whose decoder layers hold an attention module with separate
q/k/v projections and an output projection (q_proj, k_proj, v_proj, o_proj or dense) and, optionally,
per-head q/k norms. That covers the Llama, Mistral, Qwen2/2.5/QwQ and Qwen3 families and many more.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qwerky.errors import QwerkyError
from qwerky.modeling.modeling_qwerky import find_decoder_layers

FAMILY_HINT = ("supported: decoder causal LMs whose layers have an attention module with q_proj, k_proj, "
               "v_proj and o_proj (Qwen2/2.5/QwQ, Qwen3, Llama, Mistral and look-alikes)")

PROJECTIONS = {"q_proj": "receptance", "k_proj": "key", "v_proj": "value", "o_proj": "output",
               "dense": "output", "q_norm": "r_norm", "k_norm": "k_norm"}


class UnsupportedArchitectureError(QwerkyError, ValueError):
    """The teacher's architecture has no attention layout qwerky can convert."""


@dataclass
class TeacherLayout:
    """Where things are in a teacher, as found by `inspect_teacher`."""

    model_type: str
    base_prefix: str  # attribute of the CausalLM holding the base model, e.g. "model"
    layers: nn.ModuleList
    attention_name: str  # attribute of each decoder layer holding attention, e.g. "self_attn"
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    has_qk_norm: bool
    has_rope: bool


def _is_convertible_attention(module: nn.Module) -> bool:
    linear = all(isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj"))
    out = isinstance(getattr(module, "o_proj", None), nn.Linear) or isinstance(getattr(module, "dense", None),
                                                                               nn.Linear)
    return linear and out


def inspect_teacher(teacher: nn.Module) -> TeacherLayout:
    """Find decoder layers and attention modules; raise UnsupportedArchitectureError with one clear line."""
    config = getattr(teacher, "config", None)
    model_type = getattr(config, "model_type", type(teacher).__name__)
    if config is None or getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(
            f"unsupported architecture '{model_type}': not a decoder-only causal LM; {FAMILY_HINT}")
    prefix = getattr(teacher, "base_model_prefix", "model")
    base = getattr(teacher, prefix, None)
    num_layers = getattr(config, "num_hidden_layers", None)
    if base is None or num_layers is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture '{model_type}' ({type(teacher).__name__}): no base model "
            f"'{prefix}' with num_hidden_layers; {FAMILY_HINT}")
    try:
        layers = find_decoder_layers(base, num_layers)
    except ValueError as err:
        raise UnsupportedArchitectureError(f"unsupported architecture '{model_type}': {err}; {FAMILY_HINT}") from None
    first = layers[0]
    attention_name = next((n for n, m in first.named_children() if _is_convertible_attention(m)), None)
    if attention_name is None:
        found = next(((n, type(m).__name__) for n, m in first.named_children() if "att" in n.lower()), None)
        where = f"attention module {found[1]} at layer 0 '.{found[0]}'" if found else \
            f"no attention module among {[n for n, _ in first.named_children()]}"
        raise UnsupportedArchitectureError(
            f"unsupported architecture '{model_type}' ({type(teacher).__name__}): {where} has no separate "
            f"q_proj/k_proj/v_proj/o_proj; {FAMILY_HINT}")
    attn = getattr(first, attention_name)
    num_heads = config.num_attention_heads
    head_dim = getattr(attn, "head_dim", None) or attn.q_proj.out_features // num_heads
    if attn.q_proj.out_features != num_heads * head_dim:
        raise UnsupportedArchitectureError(
            f"unsupported architecture '{model_type}': q_proj has {attn.q_proj.out_features} outputs, expected "
            f"{num_heads} heads x {head_dim}")
    num_kv = attn.k_proj.out_features // head_dim
    if num_heads % num_kv:
        raise UnsupportedArchitectureError(
            f"unsupported architecture '{model_type}': {num_heads} query heads not divisible by {num_kv} kv heads")
    scaling = float(getattr(attn, "scaling", head_dim**-0.5))
    has_rope = any("rotary" in n.lower() for n, _ in base.named_children())
    return TeacherLayout(model_type, prefix, layers, attention_name, num_heads, num_kv, head_dim, scaling,
                         has_qk_norm=getattr(attn, "q_norm", None) is not None, has_rope=has_rope)
