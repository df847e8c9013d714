"""RAD-RWKV6 for vLLM: qwerky's `mixer_rwkv6.RWKV6Mixer` on vLLM's parallel layers.

State per layer: S [H, D, D] (fp32 by default) and the token shift's previous input [C] (the model's
dtype, replicated over tensor-parallel ranks). The data-dependent shift mixes are over the whole hidden
row, so their LoRA is replicated; decay LoRA, gate and state are sharded by head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from vllm.model_executor.layers.linear import ColumnParallelLinear

from qwerky.modeling.ops_rwkv6 import rwkv6_attention
from qwerky.vllm.layer import LowRankTP, StateLayer, head_sharded, replicated
from qwerky.vllm.ops import PackedBatch, run_packed

MIN_LOG_DECAY = -5.0  # as qwerky.modeling.mixer_rwkv6
NUM_SHIFTS = 5  # r, k, v, w, g


class RWKV6TimeMix(StateLayer):
    fused_rkv = False
    shifts_tokens = True

    def __init__(self, config, layer_idx: int, first_layer: bool, vllm_config, prefix: str) -> None:
        super().__init__(config, layer_idx, first_layer, vllm_config, prefix)
        C, HD = self.hidden_size, self.total_heads * self.head_dim
        self.shift_base = replicated(NUM_SHIFTS, C, dtype=self.dtype)
        self.shift_lora = LowRankTP(C, config.decay_rank, NUM_SHIFTS * C, "tanh", f"{prefix}.shift_lora",
                                    sharded=False)
        self.decay_base = head_sharded(self.num_heads * self.head_dim, self.dtype)
        self.decay_lora = LowRankTP(C, config.decay_rank, HD, "tanh", f"{prefix}.decay_lora")
        self.gate = ColumnParallelLinear(C, HD, bias=False, prefix=f"{prefix}.gate")

    def forward(self, positions: torch.Tensor, x: torch.Tensor, v_first: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        N, C = x.shape
        H, D = self.num_heads, self.head_dim
        xx = self.token_shift(x) - x
        mixes = self.shift_base + self.shift_lora(x + xx * 0.5).view(N, NUM_SHIFTS, C)
        xr, xk, xv, xw, xg = (x + xx * mixes[:, i] for i in range(NUM_SHIFTS))
        r, k, v = self.rkv(positions, xr, xk, xv)
        log_w = (-torch.exp(self.decay_base + self.decay_lora(xw))).clamp(min=MIN_LOG_DECAY).view(N, H, D)
        k = k * (1 - log_w.exp())
        y = self.run_state_update([r, k, v, log_w], torch.empty_like(v))
        y = y.reshape(N, H * D) * (2 * torch.sigmoid(self.gate(xg)[0]))
        out, _ = self.output(y)
        return out, v_first

    def state_update(self, inputs: Sequence[torch.Tensor], out: torch.Tensor, batch: PackedBatch) -> None:
        bonus = torch.ones(self.num_heads, self.head_dim, dtype=torch.float32, device=out.device)

        def step(xs: Sequence[torch.Tensor], s0: Sequence[torch.Tensor] | None, cu_seqlens: torch.Tensor | None):
            r, k, v, w = xs
            o, s = rwkv6_attention(r, k, v, w, bonus, scale=self.head_dim**-0.5,
                                   initial_state=None if s0 is None else s0[0].float(), output_final_state=True,
                                   backend=self.backend, cu_seqlens=cu_seqlens)
            return o, [s]

        run_packed(step, inputs, [self.kv_cache[0]], batch, out)


LAYER = RWKV6TimeMix  # the layer qwerky.vllm.supported_mixers() finds for mixer 'rwkv6'
