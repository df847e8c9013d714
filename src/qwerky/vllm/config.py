"""The config class vLLM sees for model_type "qwerky": qwerky's own, with the teacher's fields vLLM reads
from the top level of a text config (context length, KV heads, norm eps) copied up
from teacher_config; hybrids (attention layers kept) are routed to the hybrid model class."""

from __future__ import annotations

from typing import Any

from qwerky.modeling.configuration_qwerky import QwerkyConfig

# read by vLLM's ModelConfig (max_model_len, head counts) and by the model code
HYBRID_ARCHITECTURE = "QwerkyHybridForCausalLM"
_COPIED = ("max_position_embeddings", "rms_norm_eps", "intermediate_size", "hidden_act", "rope_parameters")


class VllmQwerkyConfig(QwerkyConfig):
    model_type = "qwerky"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        tc = self.teacher_config
        if tc is not None:
            for name in _COPIED:
                if getattr(self, name, None) is None and getattr(tc, name, None) is not None:
                    setattr(self, name, getattr(tc, name))
        if self.num_kv_heads is not None:
            self.num_key_value_heads = self.num_kv_heads
        if self.attention_layers and self.num_hidden_layers:
            # a hybrid: vLLM's hybrid model class, and the per-layer kinds vLLM counts its KV-cache layers from
            kept = set(self.attention_layers)
            self.architectures = [HYBRID_ARCHITECTURE]
            self.layers_block_type = ["attention" if i in kept else "linear_attention"
                                      for i in range(self.num_hidden_layers)]
