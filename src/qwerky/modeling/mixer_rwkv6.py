"""RAD-RWKV6 time-mix block (the alternative student).

Data-dependent token shift (mixes start at zero: no shift), decay w = exp(-exp(w0 + tanh(x W1) W2))
with log-decay clamped at >= -5, k <- k (1 - w), gated linear attention without a learned bonus
(the current token enters at full weight: u = 1), a full-rank sigmoid output gate initialised at
zero (scaled by 2 so it starts as the identity), no norm, no RoPE. State: S [H, D, D] fp32 and the
previous token's input (for the shift).

Copied into every exported model folder: imports nothing from qwerky.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layers_common import LowRank, head_norm, repeat_heads, take_projections
from .mixer_base import Mixer, MixerOptions, register_mixer
from .ops_rwkv6 import rwkv6_attention

MIN_LOG_DECAY = -5.0


@register_mixer
class RWKV6Mixer(Mixer):
    """Replaces one attention block; takes over the teacher attention's projection modules."""

    name = "rwkv6"
    Options = MixerOptions
    uses_rope = False  # RAD-RWKV6 has no RoPE: the token shift and decays carry position
    description = "RAD-RWKV6: gated linear attention with data-dependent decay and token shift, no RoPE"

    def __init__(self, config: Any, layer_idx: int, attention: nn.Module, first_layer: bool,
                 options: MixerOptions) -> None:
        super().__init__(config, layer_idx, attention, first_layer, options)
        C, H, D = config.hidden_size, self.num_heads, self.head_dim
        take_projections(self, attention)
        self.shift_base = nn.Parameter(torch.empty(5, C))  # r, k, v, w, g
        self.shift_lora = LowRank(C, config.decay_rank, 5 * C)
        self.decay_base = nn.Parameter(torch.empty(H * D))
        self.decay_lora = LowRank(C, config.decay_rank, H * D)
        self.gate = nn.Linear(C, H * D, bias=False)

    @torch.no_grad()
    def reset_new_parameters(self) -> None:
        self.shift_base.zero_()  # no token shift at the start
        self.shift_lora.reset_parameters()
        self.decay_base.copy_(torch.linspace(-6.0, 1.0, self.head_dim).repeat(self.num_heads))
        self.decay_lora.reset_parameters()
        self.gate.weight.zero_()  # 2 * sigmoid(0) = 1: the gate starts as the identity

    def init_state(self, batch_size: int, device: torch.device | None) -> dict[str, torch.Tensor]:
        D, C = self.head_dim, self.shift_base.shape[1]
        return {"S": torch.zeros(batch_size, self.num_heads, D, D, dtype=torch.float32, device=device),
                "shift": torch.zeros(batch_size, C, dtype=self.shift_base.dtype, device=device)}

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Any = None,
                attention_mask: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        x = hidden_states
        B, T, C = x.shape
        H, D = self.num_heads, self.head_dim
        layer_state = self.ctx.layer_state(self.layer_idx)
        mask = self.ctx.token_mask
        xm = x if mask is None else x * mask[:, :, None].to(x.dtype)
        first = xm.new_zeros(B, 1, C) if layer_state is None else layer_state["shift"][:, None].to(x.dtype)
        x_prev = torch.cat([first, xm[:, :-1]], dim=1)
        if layer_state is not None:
            last = xm[:, -1]
            if mask is not None:  # a padded last column keeps the previous shift
                last = torch.where(mask[:, -1:], last, layer_state["shift"].to(x.dtype))
            layer_state["shift"] = last
        xx = x_prev - x
        mixes = self.shift_base[None, None] + self.shift_lora(x + xx * 0.5).view(B, T, 5, C)
        xr, xk, xv, xw, xg = (x + xx * mixes[:, :, i] for i in range(5))
        r = self.receptance(xr).view(B, T, H, D)
        k = self.key(xk).view(B, T, self.num_kv_heads, D)
        v = self.value(xv).view(B, T, self.num_kv_heads, D)
        r, k = head_norm(self.r_norm, r), head_norm(self.k_norm, k)
        n_rep = H // self.num_kv_heads
        k, v = repeat_heads(k, n_rep), repeat_heads(v, n_rep)
        log_w = (-torch.exp(self.decay_base + self.decay_lora(xw))).clamp(min=MIN_LOG_DECAY).view(B, T, H, D)
        k = k * (1 - log_w.exp())
        if mask is not None:
            m = mask[:, :, None, None].to(k.dtype)
            k, log_w = k * m, log_w * m
        s0 = None if layer_state is None else layer_state["S"]
        bonus = torch.ones(H, D, dtype=torch.float32, device=x.device)  # no learned bonus (RAD-RWKV6)
        y, s = rwkv6_attention(r, k, v, log_w, bonus, scale=D**-0.5, initial_state=s0,
                               output_final_state=layer_state is not None, backend=self.ctx.backend)
        if layer_state is not None:
            layer_state["S"] = s
        y = y.reshape(B, T, H * D) * (2 * torch.sigmoid(self.gate(xg)))
        return self.output(y), None


from .modeling_qwerky import QwerkyForCausalLM  # noqa: E402,F401  (exported folders' entry point: mixer_base)
