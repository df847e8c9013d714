"""ARWKV7 for vLLM: qwerky's `mixer_arwkv7.ARWKV7Mixer` (RWKV-7 as llama.cpp's arwkv7 graph computes it).

State per layer: the wkv state S [H, D, D] (fp32 by default) and the token shift's previous input [C]
(the model's dtype; the whole hidden row, replicated over tensor-parallel ranks). No RoPE, and the
teacher's q/k/v/o biases and q/k norms in the exported folder are not used (as in the mixer), so
they are skipped at load. r/k/v stay three linears, each fed its own shifted input.
"""

from __future__ import annotations

import torch

from qwerky.modeling.mixer_arwkv7 import (
    LOG_DECAY_SCALE,
    SHIFTS,
    arwkv7_bonus,
    arwkv7_keys,
    token_shift_inputs,
)
from qwerky.modeling.mixer_rwkv7 import delta_rule_terms, rwkv7_log_decay
from qwerky.vllm.layer import head_sharded, replicated
from qwerky.vllm.rwkv7 import RWKV7TimeMix


class ARWKV7TimeMix(RWKV7TimeMix):
    """RWKV-7's parameters (decay, in-context rate, value residual, gate) plus the token shift, the
    removal-key and key-scaling vectors and the bonus."""

    fused_rkv = False
    shifts_tokens = True
    teacher_extras = False

    def __init__(self, config, layer_idx: int, first_layer: bool, vllm_config, prefix: str) -> None:
        super().__init__(config, layer_idx, first_layer, vllm_config, prefix)
        local = self.num_heads * self.head_dim
        self.shift = replicated(len(SHIFTS), self.hidden_size, dtype=self.dtype)
        self.key_removal = head_sharded(local, self.dtype)
        self.key_iclr = head_sharded(local, self.dtype)
        self.bonus = head_sharded(self.num_heads, self.dtype, self.head_dim)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, v_first: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        N, H, D = x.shape[0], self.num_heads, self.head_dim
        xr, xw, xk, xv, xa, xg = token_shift_inputs(x, self.token_shift(x), self.shift)
        r, k, v = self.rkv(positions, xr, xk, xv)
        v, v_first = self.value_residual(v, v_first, xv)
        log_w = rwkv7_log_decay(self.decay_base + self.decay_lora(xw), LOG_DECAY_SCALE).view(N, H, D)
        a = torch.sigmoid(self.iclr_base + self.iclr_lora(xa)).view(N, H, D)
        kk, k = arwkv7_keys(k, a, self.key_removal.view(H, D), self.key_iclr.view(H, D))
        bonus = arwkv7_bonus(r, k, v, self.bonus, D**-0.5)
        y = self.run_state_update([r, log_w, k, v, *delta_rule_terms(kk, a)], torch.empty_like(v))
        y = (y + bonus).reshape(N, H * D) * (1 + self.gate_lora(xg))
        out, _ = self.output(y)
        return out, v_first


LAYER = ARWKV7TimeMix  # the layer qwerky.vllm.supported_mixers() finds for mixer 'arwkv7'
