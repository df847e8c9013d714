"""QwerkyConfig: the teacher's own config plus the settings of the mixers that replaced its attention.

Copied into every exported model folder: imports nothing from qwerky.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import AutoConfig, PretrainedConfig

MIXERS = ("rwkv7", "rwkv6", "window")


def lora_rank(hidden_size: int, exponent: float, multiplier: float) -> int:
    """Low-rank size round(C^e * m / 32) * 32, at least 32 (method.md)."""
    return max(32, int(round(hidden_size**exponent * multiplier / 32)) * 32)


class QwerkyConfig(PretrainedConfig):
    """Config of a converted model.

    Attributes:
        teacher_config: the teacher's HF config; embeddings, MLPs, norms and head are built from it.
        mixer: "rwkv7" (RAD-RWKV7, default), "rwkv6" (RAD-RWKV6) or "window" (softmax over the last
            `window_size` tokens + `num_sinks` sinks, plus an RWKV-7 state for everything older).
        attention_layers: layer indices that keep the teacher's full attention (a hybrid).
        attention_name: attribute name of the attention module inside each decoder layer.
        num_heads / num_kv_heads / head_dim: attention geometry taken from the teacher.
        attention_scaling: the teacher's softmax scale (used by window/full attention).
        use_rope: apply the teacher's RoPE to receptance/key (RWKV-7 and window mixers).
        has_qk_norm: per-head q/k norms exist in the teacher (Qwen3); kept as r/k norms.
        window_size / num_sinks: geometry of the window mixer.
        branch_rope: window mixer: rotate the RWKV-7 branch's r/k with RoPE too. Off, the state holds no
            positions, so what it learned at the training length holds past it (method.md reports that
            dropping RoPE on the linear path helps length generalisation). True for configs that predate it.
        branch_decay_init: window mixer: (lowest, highest) initial decay logit of the branch's channels;
            the window covers the last tokens, so the branch's decays can start slow (-5..1 predates it).
        branch_center_keys: window mixer: the branch reads with keys minus a per-channel offset (`key_offset`,
            set to the mean key of real text before training). Softmax ignores what all keys share; a
            linear state does not, and a shared component drowns its reads and, through the delta rule's
            removal, erases its memory. False for configs that predate it.
        branch_own_qk: window mixer: the branch has its own receptance/key projections (copies of the
            teacher's q/k at conversion), so that what it learns does not have to suit the window too.
        chunk_size: chunk length of the parallel form.
        lm_head_bias: the teacher's LM head has a bias (Phi).
        decay_rank / iclr_rank / value_rank / gate_rank: low-rank sizes of the RWKV-7 adapters.
    """

    model_type = "qwerky"
    sub_configs = {"teacher_config": AutoConfig}

    def __init__(
        self,
        teacher_config: dict[str, Any] | PretrainedConfig | None = None,
        mixer: str = "rwkv7",
        attention_layers: list[int] | None = None,
        attention_name: str = "self_attn",
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        attention_scaling: float | None = None,
        use_rope: bool = True,
        has_qk_norm: bool = False,
        window_size: int = 64,
        num_sinks: int = 4,
        branch_rope: bool = True,
        branch_decay_init: tuple[float, float] | list[float] = (-5.0, 1.0),
        branch_center_keys: bool = False,
        branch_own_qk: bool = False,
        chunk_size: int = 64,
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
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        self.mixer = mixer
        self.attention_layers = sorted(attention_layers or [])
        self.attention_name = attention_name
        tc = teacher_config
        hidden = getattr(tc, "hidden_size", 0) if tc is not None else 0
        self.num_heads = num_heads or (tc.num_attention_heads if tc is not None else None)
        self.num_kv_heads = num_kv_heads or (getattr(tc, "num_key_value_heads", None) or self.num_heads
                                             if tc is not None else None)
        if head_dim is None and tc is not None:
            head_dim = getattr(tc, "head_dim", None) or hidden // tc.num_attention_heads
        self.head_dim = head_dim
        self.attention_scaling = attention_scaling or (1.0 / math.sqrt(head_dim) if head_dim else None)
        self.use_rope = use_rope
        self.has_qk_norm = has_qk_norm
        self.window_size = window_size
        self.num_sinks = num_sinks
        self.branch_rope = branch_rope
        if len(branch_decay_init) != 2 or branch_decay_init[0] > branch_decay_init[1]:
            raise ValueError(f"branch_decay_init must be (lowest, highest), got {branch_decay_init!r}")
        self.branch_decay_init = [float(x) for x in branch_decay_init]
        self.branch_center_keys = branch_center_keys
        self.branch_own_qk = branch_own_qk
        self.chunk_size = chunk_size
        self.lm_head_bias = lm_head_bias
        self.decay_rank = decay_rank or (lora_rank(hidden, 0.5, 1.8) if hidden else 32)
        self.iclr_rank = iclr_rank or (lora_rank(hidden, 0.5, 1.8) if hidden else 32)
        self.value_rank = value_rank or (lora_rank(hidden, 0.5, 1.3) if hidden else 32)
        self.gate_rank = gate_rank or (lora_rank(hidden, 0.8, 0.6) if hidden else 32)
        if tc is not None:
            for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
                kwargs.setdefault(name, getattr(tc, name, None))
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                kwargs.setdefault(name, getattr(tc, name, None))
            kwargs.setdefault("tie_word_embeddings", getattr(tc, "tie_word_embeddings", False))
        super().__init__(**kwargs)

    def get_text_config(self, *args: Any, **kwargs: Any) -> PretrainedConfig:
        return self
