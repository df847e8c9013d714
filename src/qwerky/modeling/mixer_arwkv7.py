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

from .layers_common import repeat_heads
from .mixer_base import MixerOptions, register_mixer
from .mixer_rwkv7 import RWKV7Mixer, removal_key, rwkv7_log_decay

LOG_DECAY_SCALE = 0.606531  # llama.cpp's literal (ggml_scale(sigmoid(w), -0.606531)), not exp(-0.5)
SHIFTS = ("r", "w", "k", "v", "a", "g")  # llama.cpp's time_mix_lerp_fused order


# ARWKV7's own parts, on [..., H, D] like mixer_rwkv7's (qwerky.vllm calls them too).

def token_shift_inputs(x: torch.Tensor, x_prev: torch.Tensor, shift: torch.Tensor) -> list[torch.Tensor]:
    """x + (x_prev - x) mu for r, w, k, v, a, g (shift: [6, C], in SHIFTS order)."""
    xx = x_prev - x
    return [x + xx * shift[i] for i in range(len(SHIFTS))]


def arwkv7_keys(k: torch.Tensor, a: torch.Tensor, key_removal: torch.Tensor, key_iclr: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's keys: the removal key kk = normalize(k * k_k) and the written key k (1 + (a - 1) k_a)
    (key_removal, key_iclr: [H, D])."""
    return removal_key(k * key_removal), k * (1 + (a - 1) * key_iclr)


def arwkv7_bonus(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bonus: torch.Tensor, scale: float
                 ) -> torch.Tensor:
    """The current token's direct term v sum(r scale * k * r_k) (bonus: [H, D])."""
    return ((r * scale) * k * bonus).sum(-1, keepdim=True) * v


@register_mixer
class ARWKV7Mixer(RWKV7Mixer):
    """Replaces one attention block with llama.cpp's ARWKV7 time mix: RWKV-7's parameters (decay, in-context
    rate, value residual, gate) plus the token shift, the removal-key and key-scaling vectors and the bonus."""

    name = "arwkv7"
    Options = MixerOptions
    uses_rope = False  # llama.cpp's graph rotates nothing: the decays and the token shift carry position
    description = ("ARWKV7: RWKV-7 as llama.cpp's arwkv7 graph runs it (no RoPE, no biases): "
                   "exports to GGUF (`qwerky export --format gguf`)")

    def __init__(self, config: Any, layer_idx: int, attention: nn.Module, first_layer: bool,
                 options: MixerOptions) -> None:
        super().__init__(config, layer_idx, attention, first_layer, options)
        H, D = self.num_heads, self.head_dim
        self.shift = nn.Parameter(torch.empty(len(SHIFTS), config.hidden_size))
        self.key_removal = nn.Parameter(torch.empty(H * D))  # llama.cpp time_mix_k_k
        self.key_iclr = nn.Parameter(torch.empty(H * D))  # time_mix_k_a
        self.bonus = nn.Parameter(torch.empty(H, D))  # time_mix_r_k

    @torch.no_grad()
    def reset_new_parameters(self) -> None:
        super().reset_new_parameters()  # RWKV-7's: decays -5..1 per head, value residual at sigmoid(-3)
        self.shift.zero_()
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
        return token_shift_inputs(x, x_prev, self.shift)

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
        v = self._value_residual(v, xv)
        log_w = rwkv7_log_decay(self.decay_base + self.decay_lora(xw), LOG_DECAY_SCALE).view(B, T, H, D)
        a = torch.sigmoid(self.iclr_base + self.iclr_lora(xa)).view(B, T, H, D)
        kk, k = arwkv7_keys(k, a, self.key_removal.view(H, D), self.key_iclr.view(H, D))
        bonus = arwkv7_bonus(r, k, v, self.bonus, D**-0.5)
        y = self._delta_rule(r, log_w, k, v, kk, a, layer_state)
        y = (y + bonus).reshape(B, T, H * D) * (1 + self.gate_lora(xg))
        out = self.output  # llama.cpp's graph has no output bias: a teacher's o_proj bias is dropped
        return (out(y) if out.bias is None else F.linear(y, out.weight)), None


from .modeling_qwerky import QwerkyForCausalLM  # noqa: E402,F401  (exported folders' entry point: mixer_base)
