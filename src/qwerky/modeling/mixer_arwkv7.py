"""ARWKV7 time-mix block: RWKV-7 exactly as llama.cpp's released `arwkv7` graph computes it, so the
student exports to GGUF and runs in stock llama.cpp / ollama / llama-cpp-python (`qwerky export`).

It differs from RAD-RWKV7 (mixer_rwkv7) only where llama.cpp's graph has no place for RAD-RWKV7's
parts (see docs/gguf.md): no RoPE on r/k, no q/k/v/o biases and no Qwen3 q/k norms (the teacher's
tensors stay in the module but are not used: the graph has no constant term and no per-head norm),
llama.cpp's removal key and key scaling instead of the "balanced" key, plus its (here zero-started)
token shift and bonus. Per head (state S [D, D] fp32, see ops_rwkv7), with x_* = x + (x_prev - x) mu_*:

    r, k, v = W_q x_r, W_k x_k, W_v x_v              (GQA k/v heads repeated: expanded at export)
    w = exp(-0.606531 * sigmoid(w0 + tanh(x_w W1) W2))
    a = sigmoid(a0 + x_a A1 A2);  kk = normalize(k * k_k);  k <- k (1 + (a - 1) k_a)
    v <- v + (v_first - v) sigmoid(v0 + x_v V1 V2)    (not in the first layer)
    S <- diag(w) S - (kk a) (kk^T S) + k v^T,  y = S^T r D^-0.5 + v sum(r D^-0.5 * k * r_k)
    y <- y * (1 + sigmoid(x_g G1) G2), then W_o

The D^-0.5 scale is folded into W_q at export and the gate's "1 +" into one extra gate rank
(sigmoid(0) = 1/2 exactly), so the exported graph computes the same function. New parts start with
little effect: mu = 0 (no shift), r_k = 0 (no bonus), k_k = k_a = 1, the gate at one, value residual
at sigmoid(-3).

Copied into every exported model folder: imports nothing from qwerky.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers_common import LowRank, repeat_heads, take_projections
from .mixer_base import Mixer, MixerOptions, register_mixer
from .ops_rwkv7 import rwkv7_attention

LOG_DECAY_SCALE = 0.606531  # llama.cpp's literal (ggml_scale(sigmoid(w), -0.606531)), not exp(-0.5)
SHIFTS = ("r", "w", "k", "v", "a", "g")  # llama.cpp's time_mix_lerp_fused order


@register_mixer
class ARWKV7Mixer(Mixer):
    """Replaces one attention block with llama.cpp's ARWKV7 time mix; takes over the teacher's q/k/v/o."""

    name = "arwkv7"
    Options = MixerOptions
    uses_rope = False  # llama.cpp's graph rotates nothing: the decays and the token shift carry position
    description = ("ARWKV7: RWKV-7 as llama.cpp's arwkv7 graph runs it (no RoPE, no biases): "
                   "exports to GGUF (`qwerky export --format gguf`)")

    def __init__(self, config: Any, layer_idx: int, attention: nn.Module, first_layer: bool,
                 options: MixerOptions) -> None:
        super().__init__(config, layer_idx, attention, first_layer, options)
        C, H, D = config.hidden_size, self.num_heads, self.head_dim
        take_projections(self, attention)
        self.shift = nn.Parameter(torch.empty(len(SHIFTS), C))
        self.decay_base = nn.Parameter(torch.empty(H * D))
        self.decay_lora = LowRank(C, config.decay_rank, H * D)
        self.iclr_base = nn.Parameter(torch.empty(H * D))
        self.iclr_lora = LowRank(C, config.iclr_rank, H * D, activation="none")
        if not first_layer:
            self.value_mix_base = nn.Parameter(torch.empty(H * D))
            self.value_mix_lora = LowRank(C, config.value_rank, H * D, activation="none")
        self.gate_lora = LowRank(C, config.gate_rank, H * D, activation="sigmoid")
        self.key_removal = nn.Parameter(torch.empty(H * D))  # llama.cpp time_mix_k_k
        self.key_iclr = nn.Parameter(torch.empty(H * D))  # time_mix_k_a
        self.bonus = nn.Parameter(torch.empty(H, D))  # time_mix_r_k

    @torch.no_grad()
    def reset_new_parameters(self) -> None:
        self.shift.zero_()
        self.decay_base.copy_(torch.linspace(-5.0, 1.0, self.head_dim).repeat(self.num_heads))
        self.decay_lora.reset_parameters()
        self.iclr_base.zero_()
        self.iclr_lora.reset_parameters()
        if not self.first_layer:
            self.value_mix_base.fill_(-3.0)  # sigmoid(-3) = 0.05: little value residual at the start
            self.value_mix_lora.reset_parameters()
        self.gate_lora.reset_parameters()
        self.key_removal.fill_(1.0)  # kk = normalize(k): remove along the key that is written
        self.key_iclr.fill_(1.0)  # k <- k a: write as strongly as the removal (RWKV-7's own start)
        self.bonus.zero_()

    def init_state(self, batch_size: int, device: torch.device | None) -> dict[str, torch.Tensor]:
        D, C = self.head_dim, self.shift.shape[1]
        return {"S": torch.zeros(batch_size, self.num_heads, D, D, dtype=torch.float32, device=device),
                "shift": torch.zeros(batch_size, C, dtype=self.shift.dtype, device=device)}

    def _shifted(self, x: torch.Tensor, layer_state: dict[str, torch.Tensor] | None) -> list[torch.Tensor]:
        """x + (x_prev - x) mu for r, w, k, v, a, g; keeps the last real token's x in the state."""
        B, T, C = x.shape
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
        return [x + xx * self.shift[i] for i in range(len(SHIFTS))]

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Any = None,
                attention_mask: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        x = hidden_states
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        layer_state = self.ctx.layer_state(self.layer_idx)
        xr, xw, xk, xv, xa, xg = self._shifted(x, layer_state)
        n_rep = H // self.num_kv_heads
        r = F.linear(xr, self.receptance.weight).view(B, T, H, D)  # no bias: the graph has none
        k = repeat_heads(F.linear(xk, self.key.weight).view(B, T, self.num_kv_heads, D), n_rep)
        v = repeat_heads(F.linear(xv, self.value.weight).view(B, T, self.num_kv_heads, D), n_rep)
        if self.first_layer or self.ctx.v_first is None:
            self.ctx.v_first = v
        else:
            mix = torch.sigmoid(self.value_mix_base + self.value_mix_lora(xv)).view(B, T, H, D)
            v = v + (self.ctx.v_first - v) * mix
        log_w = -LOG_DECAY_SCALE * torch.sigmoid(self.decay_base + self.decay_lora(xw)).view(B, T, H, D)
        a = torch.sigmoid(self.iclr_base + self.iclr_lora(xa)).view(B, T, H, D)
        kk = F.normalize((k * self.key_removal.view(H, D)).float(), dim=-1).to(k.dtype)
        k = k * (1 + (a - 1) * self.key_iclr.view(H, D))
        scale = D**-0.5
        bonus = ((r * scale) * k * self.bonus).sum(-1, keepdim=True) * v
        k_in = k
        mask = self.ctx.token_mask
        if mask is not None:  # padding leaves the state untouched: no input, no decay, no removal
            m = mask[:, :, None, None].to(k.dtype)
            k_in, log_w, a = k * m, log_w * m, a * m
        s0 = None if layer_state is None else layer_state["S"]
        y, s = rwkv7_attention(r, log_w, k_in, v, -kk, kk * a, scale=scale, initial_state=s0,
                               output_final_state=layer_state is not None, backend=self.ctx.backend)
        if layer_state is not None:
            layer_state["S"] = s
        y = (y + bonus).reshape(B, T, H * D) * (1 + self.gate_lora(xg))
        out = self.output  # llama.cpp's graph has no output bias: a teacher's o_proj bias is dropped
        return (out(y) if out.bias is None else F.linear(y, out.weight)), None


from .modeling_qwerky import QwerkyForCausalLM  # noqa: E402,F401  (exported folders' entry point: mixer_base)
