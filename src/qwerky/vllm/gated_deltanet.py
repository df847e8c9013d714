"""Gated DeltaNet for vLLM: qwerky's `mixer_gated_deltanet.GatedDeltaNetMixer` on vLLM's parallel layers.

State: S [H, D, D] (fp32 by default) per layer. The per-head decay and write-strength projections
(`decay_proj`, `beta_proj`: one output per head) are column-parallel, so each rank computes its own
heads; the gate's LoRA is sharded like RWKV-7's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.linear import ColumnParallelLinear

from qwerky.modeling.ops_gated_deltanet import gated_delta_rule
from qwerky.vllm.layer import LowRankTP, StateLayer
from qwerky.vllm.ops import PackedBatch, run_packed

MAX_DECAY_RATE = 5.0  # as qwerky.modeling.mixer_gated_deltanet


class GatedDeltaNetLayer(StateLayer):
    def __init__(self, config, layer_idx: int, first_layer: bool, vllm_config, prefix: str) -> None:
        super().__init__(config, layer_idx, first_layer, vllm_config, prefix)
        C, H = self.hidden_size, self.total_heads
        self.decay_proj = ColumnParallelLinear(C, H, bias=True, prefix=f"{prefix}.decay_proj")
        self.beta_proj = ColumnParallelLinear(C, H, bias=True, prefix=f"{prefix}.beta_proj")
        self.gate_lora = LowRankTP(C, config.gate_rank, H * self.head_dim, "sigmoid", f"{prefix}.gate_lora")

    def forward(self, positions: torch.Tensor, x: torch.Tensor, v_first: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        N, H, D = x.shape[0], self.num_heads, self.head_dim
        q, k, v = self.rkv(positions, x)
        q = F.normalize(q.float(), dim=-1).to(v.dtype)
        k = F.normalize(k.float(), dim=-1).to(v.dtype)
        g = -MAX_DECAY_RATE * torch.sigmoid(self.decay_proj(x)[0].float())
        beta = torch.sigmoid(self.beta_proj(x)[0].float())
        y = self.run_state_update([q, k, v, g, beta], torch.empty_like(v))
        y = y.reshape(N, H * D) * (1 + self.gate_lora(x))
        out, _ = self.output(y)
        return out, v_first

    def state_update(self, inputs: Sequence[torch.Tensor], out: torch.Tensor, batch: PackedBatch) -> None:
        def step(xs: Sequence[torch.Tensor], s0: Sequence[torch.Tensor] | None, cu_seqlens: torch.Tensor | None):
            o, s = gated_delta_rule(*xs, scale=1.0, initial_state=None if s0 is None else s0[0].float(),
                                    output_final_state=True, backend=self.backend, cu_seqlens=cu_seqlens)
            return o, [s]

        run_packed(step, inputs, [self.kv_cache[0]], batch, out)


LAYER = GatedDeltaNetLayer  # the layer qwerky.vllm.supported_mixers() finds for mixer 'gated_deltanet'
