"""ARWKV7 for vLLM: qwerky's `mixer_arwkv7.ARWKV7Mixer` (RWKV-7 as llama.cpp's arwkv7 graph computes it).

State per layer: the wkv state S [H, D, D] (fp32 by default) and the token shift's previous input [C]
(the model's dtype; the whole hidden row, replicated over tensor-parallel ranks). No RoPE, and the
teacher's q/k/v/o biases and q/k norms in the exported folder are not used (as in the mixer), so
they are skipped at load. r/k/v stay three linears, each fed its own shifted input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwerky.vllm.layer import head_sharded, replicated
from qwerky.vllm.rwkv7 import RWKV7TimeMix

LOG_DECAY_SCALE = 0.606531  # as qwerky.modeling.mixer_arwkv7 (llama.cpp's literal)
NUM_SHIFTS = 6  # r, w, k, v, a, g


class ARWKV7TimeMix(RWKV7TimeMix):
    """RWKV-7's parameters (decay, in-context rate, value residual, gate) plus the token shift, the
    removal-key and key-scaling vectors and the bonus."""

    fused_rkv = False
    shifts_tokens = True
    teacher_extras = False

    def __init__(self, config, layer_idx: int, first_layer: bool, vllm_config, prefix: str) -> None:
        super().__init__(config, layer_idx, first_layer, vllm_config, prefix)
        local = self.num_heads * self.head_dim
        self.shift = replicated(NUM_SHIFTS, self.hidden_size, dtype=self.dtype)
        self.key_removal = head_sharded(local, self.dtype)
        self.key_iclr = head_sharded(local, self.dtype)
        self.bonus = head_sharded(self.num_heads, self.dtype, self.head_dim)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, v_first: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        N, H, D = x.shape[0], self.num_heads, self.head_dim
        xx = self.token_shift(x) - x
        xr, xw, xk, xv, xa, xg = (x + xx * self.shift[i] for i in range(NUM_SHIFTS))
        r, k, v = self.rkv(positions, xr, xk, xv)
        if self.first_layer or v_first is None:
            v_first = v
        else:
            mix = torch.sigmoid(self.value_mix_base + self.value_mix_lora(xv)).view(N, H, D)
            v = v + (v_first - v) * mix
        log_w = (-LOG_DECAY_SCALE * torch.sigmoid(self.decay_base + self.decay_lora(xw))).view(N, H, D)
        a = torch.sigmoid(self.iclr_base + self.iclr_lora(xa)).view(N, H, D)
        kk = F.normalize((k * self.key_removal.view(H, D)).float(), dim=-1).to(k.dtype)
        k = k * (1 + (a - 1) * self.key_iclr.view(H, D))
        scale = D**-0.5
        bonus = ((r * scale) * k * self.bonus).sum(-1, keepdim=True) * v
        y = self.run_state_update([r, log_w, k, v, -kk, kk * a], torch.empty_like(v))
        y = (y + bonus).reshape(N, H * D) * (1 + self.gate_lora(xg))
        out, _ = self.output(y)
        return out, v_first
