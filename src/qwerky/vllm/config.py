"""The config class vLLM sees for model_type "qwerky": qwerky's own, with the teacher's fields vLLM reads
from the top level of a text config (context length, KV heads, norm eps) copied up from teacher_config."""

from __future__ import annotations

from typing import Any

from qwerky.modeling.configuration_qwerky import QwerkyConfig

# read by vLLM's ModelConfig (max_model_len, head counts) and by the model code
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
