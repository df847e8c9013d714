"""RAD-RWKV7 time-mix for vLLM: qwerky's `mixer_rwkv7.RWKV7Mixer` on vLLM's tensor-parallel layers.

State: the wkv state S [H, D, D] (fp32 by default) per layer. Tensor parallelism splits heads: r/k/v
(one QKVParallelLinear), the LoRA up-projections, the per-channel bases and the state are sharded by
head; the LoRA down-projections are replicated; the output projection is a RowParallelLinear. The value
residual (v_first: the first layer's values, per token) travels through the model's forward beside the
hidden states, so it is not part of the state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from qwerky.vllm.layer import LowRankTP, StateLayer, head_sharded
from qwerky.vllm.ops import PackedBatch, rwkv7_packed

LOG_DECAY_SCALE = math.exp(-0.5)  # as qwerky.modeling.mixer_rwkv7


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
        if self.first_layer or v_first is None:
            v_first = v
        else:
            mix = torch.sigmoid(self.value_mix_base + self.value_mix_lora(x)).view(N, H, D)
            v = v + (v_first - v) * mix
        log_w = (-LOG_DECAY_SCALE * torch.sigmoid(self.decay_base + self.decay_lora(x))).view(N, H, D)
        a = torch.sigmoid(self.iclr_base + self.iclr_lora(x)).view(N, H, D)
        kappa = F.normalize(k.float(), dim=-1).to(k.dtype)
        k_in = k * (1 - log_w.exp() + a)
        y = self.run_state_update([r, log_w, k_in, v, -kappa, kappa * a], torch.empty_like(v))
        y = y.reshape(N, H * D) * (1 + self.gate_lora(x))
        out, _ = self.output(y)
        return out, v_first

    def state_update(self, inputs: Sequence[torch.Tensor], out: torch.Tensor, batch: PackedBatch) -> None:
        out[:batch.num_tokens] = rwkv7_packed(*inputs, self.kv_cache[0], batch, scale=self.head_dim**-0.5,
                                              backend=self.backend)
