"""RAD-RWKV7 time-mix for vLLM: qwerky's `mixer_rwkv7.RWKV7Mixer` on vLLM's tensor-parallel layers.

State: the wkv state S [H, D, D] (fp32 by default) per layer. Tensor parallelism splits heads: r/k/v
(one QKVParallelLinear), the LoRA up-projections, the per-channel bases and the state are sharded by
head; the LoRA down-projections are replicated; the output projection is a RowParallelLinear. The value
residual (v_first: the first layer's values, per token) travels through the model's forward beside the
hidden states, so it is not part of the state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qwerky.modeling.mixer_rwkv7 import balanced_key, delta_rule_terms, removal_key, rwkv7_log_decay, value_residual
from qwerky.vllm.layer import LowRankTP, StateLayer, head_sharded
from qwerky.vllm.ops import PackedBatch, rwkv7_packed


class RWKV7TimeMix(StateLayer):
    def __init__(self, config, layer_idx: int, first_layer: bool, vllm_config, prefix: str) -> None:
        super().__init__(config, layer_idx, first_layer, vllm_config, prefix)
        C, H, HD = self.hidden_size, self.total_heads * self.head_dim, self.num_heads * self.head_dim
        self.decay_base = head_sharded(HD, self.dtype)
        self.decay_lora = LowRankTP(C, config.decay_rank, H, "tanh", f"{prefix}.decay_lora")
        self.iclr_base = head_sharded(HD, self.dtype)
        self.iclr_lora = LowRankTP(C, config.iclr_rank, H, "none", f"{prefix}.iclr_lora")
        if not first_layer:
            self.value_mix_base = head_sharded(HD, self.dtype)
            self.value_mix_lora = LowRankTP(C, config.value_rank, H, "none", f"{prefix}.value_mix_lora")
        self.gate_lora = LowRankTP(C, config.gate_rank, H, "sigmoid", f"{prefix}.gate_lora")

    def forward(self, positions: torch.Tensor, x: torch.Tensor, v_first: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, C] -> (output [N, C], v_first [N, H_local, D])."""
        N, H, D = x.shape[0], self.num_heads, self.head_dim
        r, k, v = self.rkv(positions, x)
        v, v_first = self.value_residual(v, v_first, x)
        log_w = rwkv7_log_decay(self.decay_base + self.decay_lora(x)).view(N, H, D)
        a = torch.sigmoid(self.iclr_base + self.iclr_lora(x)).view(N, H, D)
        kappa = removal_key(k)
        y = self.run_state_update([r, log_w, balanced_key(k, log_w, a), v, *delta_rule_terms(kappa, a)],
                                  torch.empty_like(v))
        y = y.reshape(N, H * D) * (1 + self.gate_lora(x))
        out, _ = self.output(y)
        return out, v_first

    def value_residual(self, v: torch.Tensor, v_first: torch.Tensor | None, x: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(v, v_first): the first layer's values travel on; later layers mix towards them (mixer_rwkv7)."""
        if self.first_layer or v_first is None:
            return v, v
        return value_residual(v, v_first, (self.value_mix_base + self.value_mix_lora(x)).view(v.shape)), v_first

    def state_update(self, inputs: Sequence[torch.Tensor], out: torch.Tensor, batch: PackedBatch) -> None:
        out[:batch.num_tokens] = rwkv7_packed(*inputs, self.kv_cache[0], batch, scale=self.head_dim**-0.5,
                                              backend=self.backend)


LAYER = RWKV7TimeMix  # the layer qwerky.vllm.supported_mixers() finds for mixer 'rwkv7'
