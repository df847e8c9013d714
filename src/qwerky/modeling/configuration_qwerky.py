"""QwerkyConfig: the teacher's own config plus the settings of the mixers that replaced its attention.

Copied into every exported model folder: imports nothing from qwerky.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import AutoConfig, PretrainedConfig

# Window-mixer fields that configs written before `mixer_options` kept at the top level, with the values
# those configs meant when a field was absent (the defaults of their time, not today's).
LEGACY_WINDOW_OPTIONS = {"window_size": 64, "num_sinks": 4, "branch_rope": True, "branch_decay_init": [-5.0, 1.0],
                         "branch_center_keys": False}
REMOVED_OPTIONS = ("branch_own_qk",)  # measured as no gain (docs/window_student.md) and removed


def lora_rank(hidden_size: int, exponent: float, multiplier: float) -> int:
    """Low-rank size round(C^e * m / 32) * 32, at least 32 (method.md)."""
    return max(32, int(round(hidden_size**exponent * multiplier / 32)) * 32)


def _mixer_options(mixer: str, mixer_options: dict[str, Any] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The mixer's options; a config written before `mixer_options` kept the window's at the top level (taken
    out of `kwargs` here, with the defaults of their time)."""
    legacy = {k: kwargs.pop(k) for k in (*LEGACY_WINDOW_OPTIONS, *REMOVED_OPTIONS) if k in kwargs}
    if any(legacy.get(k) for k in REMOVED_OPTIONS):
        raise ValueError(f"this model uses {', '.join(k for k in REMOVED_OPTIONS if legacy.get(k))}, an option "
                         "removed from qwerky; load it with trust_remote_code=True (its folder carries its code)")
    if legacy and mixer_options is not None:
        raise ValueError(f"{', '.join(legacy)}: mixer options now live in mixer_options (e.g. "
                         f"mixer_options={{{next(iter(legacy))!r}: ...}})")
    if mixer_options is None and mixer == "window":
        mixer_options = {k: legacy.get(k, v) for k, v in LEGACY_WINDOW_OPTIONS.items()}
    return dict(mixer_options or {})


def _attention_shape(tc: Any, num_heads: int | None, num_kv_heads: int | None, head_dim: int | None
                     ) -> tuple[int | None, int | None, int | None]:
    """(heads, key/value heads, head size): as given, else the teacher's."""
    if tc is None:
        return num_heads, num_kv_heads, head_dim
    heads = num_heads or tc.num_attention_heads
    kv_heads = num_kv_heads or getattr(tc, "num_key_value_heads", None) or heads
    return heads, kv_heads, head_dim or getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads


class QwerkyConfig(PretrainedConfig):
    """Config of a converted model.

    Attributes:
        teacher_config: the teacher's HF config; embeddings, MLPs, norms and head are built from it.
        mixer: the registered student mixer in every converted layer (`qwerky mixers` lists them).
        mixer_options: that mixer's options, validated by its own Options dataclass when the model is built.
        attention_layers: layer indices that keep the teacher's full attention (a hybrid).
        attention_name: attribute name of the attention module inside each decoder layer.
        num_heads / num_kv_heads / head_dim: attention geometry taken from the teacher.
        attention_scaling: the teacher's softmax scale (used by window/full attention).
        use_rope: apply the teacher's RoPE to receptance/key (set from the teacher and the mixer at conversion).
        has_qk_norm: per-head q/k norms exist in the teacher (Qwen3); kept as r/k norms.
        lm_head_bias: the teacher's LM head has a bias (Phi).
        decay_rank / iclr_rank / value_rank / gate_rank: low-rank sizes of the RWKV-7 adapters.
    """

    model_type = "qwerky"
    sub_configs = {"teacher_config": AutoConfig}

    def __init__(
        self,
        teacher_config: dict[str, Any] | PretrainedConfig | None = None,
        mixer: str = "rwkv7",
        mixer_options: dict[str, Any] | None = None,
        attention_layers: list[int] | None = None,
        attention_name: str = "self_attn",
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        attention_scaling: float | None = None,
        use_rope: bool = True,
        has_qk_norm: bool = False,
        decay_rank: int | None = None,
        iclr_rank: int | None = None,
        value_rank: int | None = None,
        gate_rank: int | None = None,
        lm_head_bias: bool = False,
        **kwargs: Any,
    ) -> None:
        if isinstance(teacher_config, dict):
            teacher_config = AutoConfig.for_model(**teacher_config)
        self.teacher_config = teacher_config
        self.mixer = mixer
        self.mixer_options = _mixer_options(mixer, mixer_options, kwargs)
        self.attention_layers = sorted(attention_layers or [])
        self.attention_name = attention_name
        tc = teacher_config
        hidden = getattr(tc, "hidden_size", 0) if tc is not None else 0
        self.num_heads, self.num_kv_heads, self.head_dim = _attention_shape(tc, num_heads, num_kv_heads, head_dim)
        self.attention_scaling = attention_scaling or (1.0 / math.sqrt(self.head_dim) if self.head_dim else None)
        self.use_rope = use_rope
        self.has_qk_norm = has_qk_norm
        self.lm_head_bias = lm_head_bias
        self.decay_rank = decay_rank or (lora_rank(hidden, 0.5, 1.8) if hidden else 32)
        self.iclr_rank = iclr_rank or (lora_rank(hidden, 0.5, 1.8) if hidden else 32)
        self.value_rank = value_rank or (lora_rank(hidden, 0.5, 1.3) if hidden else 32)
        self.gate_rank = gate_rank or (lora_rank(hidden, 0.8, 0.6) if hidden else 32)
        if tc is not None:  # the model-wide fields HF reads from a config are the teacher's
            for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "bos_token_id",
                         "eos_token_id", "pad_token_id"):
                kwargs.setdefault(name, getattr(tc, name, None))
            kwargs.setdefault("tie_word_embeddings", getattr(tc, "tie_word_embeddings", False))
        super().__init__(**kwargs)

    def get_text_config(self, *args: Any, **kwargs: Any) -> PretrainedConfig:
        return self
