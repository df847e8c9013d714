"""RAD-RWKV7 time-mix block: the default replacement for a teacher attention block.

Initialised from the teacher attention: q->receptance, k->key, v->value, o->output (biases and Qwen3
q/k norms kept, GQA key/value heads repeated to the query heads, the teacher's RoPE applied to r and k).
The new parts (decay, in-context learning rate, value residual, output gate) start with little or no
effect. Update per head (state S [D, D] fp32, see ops_rwkv7):

    w = exp(-e^-0.5 * sigmoid(w0 + tanh(x W1) W2))        decay in [0.545, 1]
    a = sigmoid(a0 + x A1 A2),  kappa = normalize(k)        in-context learning rate, removal key
    S <- diag(w) S - (kappa a) (kappa^T S) + k (1 - w + a) v^T   ("balanced" form, no output norm)
    y = (S^T r) * D^-0.5 * (1 + sigmoid(x G1) G2), then the teacher's o_proj

Copied into every exported model folder: imports nothing from qwerky.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers_common import LowRank, family_rope, head_norm, repeat_heads, rotate_qk, take_projections
from .mixer_base import Mixer, MixerOptions, register_mixer
from .ops_rwkv7 import rwkv7_attention

LOG_DECAY_SCALE = math.exp(-0.5)


# The RWKV-7 parts as functions of tensors whose last two dims are (heads, head_dim), whatever comes before:
# [B, T, H, D] here, vLLM's packed [N, H, D] in qwerky.vllm. Both call these, so the math has one source.

def rwkv7_log_decay(logits: torch.Tensor, scale: float = LOG_DECAY_SCALE) -> torch.Tensor:
    """log w = -scale * sigmoid(logits): a per-channel decay w in [exp(-scale), 1]."""
    return -scale * torch.sigmoid(logits)


def value_residual(v: torch.Tensor, v_first: torch.Tensor, mix_logits: torch.Tensor) -> torch.Tensor:
    """v moved towards the first layer's values by sigmoid(mix_logits) (RWKV-7's value residual)."""
    return v + (v_first - v) * torch.sigmoid(mix_logits)


def removal_key(k: torch.Tensor) -> torch.Tensor:
    """kappa = k / |k| per head (normalised in fp32): the direction the delta rule removes from the state."""
    return F.normalize(k.float(), dim=-1).to(k.dtype)


def balanced_key(k: torch.Tensor, log_w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """RAD-RWKV7's "balanced" written key k (1 - w + a): what decays and is removed is written back."""
    return k * (1 - log_w.exp() + a)


def delta_rule_terms(kappa: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's removal pair (-kappa, kappa a): S <- diag(w) S + (-kappa)(kappa a)^T S + k v^T."""
    return -kappa, kappa * a


@register_mixer
class RWKV7Mixer(Mixer):
    """Replaces one attention block; takes over the teacher attention's projection modules."""

    name = "rwkv7"
    Options = MixerOptions  # nothing to choose: the method's RAD-RWKV7 as published
    description = "RAD-RWKV7: generalised delta rule, RoPE on r/k, value residual, gate (the default)"

    def __init__(self, config: Any, layer_idx: int, attention: nn.Module, first_layer: bool,
                 options: MixerOptions) -> None:
        super().__init__(config, layer_idx, attention, first_layer, options)
        C, H, D = config.hidden_size, self.num_heads, self.head_dim
        take_projections(self, attention)
        self.rope_fn = family_rope(attention)
        self.decay_base = nn.Parameter(torch.empty(H * D))
        self.decay_lora = LowRank(C, config.decay_rank, H * D)
        self.iclr_base = nn.Parameter(torch.empty(H * D))
        self.iclr_lora = LowRank(C, config.iclr_rank, H * D, activation="none")
        if not first_layer:
            self.value_mix_base = nn.Parameter(torch.empty(H * D))
            self.value_mix_lora = LowRank(C, config.value_rank, H * D, activation="none")
        self.gate_lora = LowRank(C, config.gate_rank, H * D, activation="sigmoid")

    def decay_init(self) -> torch.Tensor:
        """Per-channel starting decay logits: a spread from fast (-5) to slow (1) within each head."""
        return torch.linspace(-5.0, 1.0, self.head_dim).repeat(self.num_heads)

    @torch.no_grad()
    def reset_new_parameters(self) -> None:
        self.decay_base.copy_(self.decay_init())
        self.decay_lora.reset_parameters()
        self.iclr_base.zero_()
        self.iclr_lora.reset_parameters()
        if not self.first_layer:
            self.value_mix_base.fill_(-3.0)  # sigmoid(-3) = 0.05: little value residual at the start
            self.value_mix_lora.reset_parameters()
        self.gate_lora.reset_parameters()

    def _project(self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """r [B,T,H,D], k and v [B,T,Hk,D] (normed and rotated like the teacher's q/k)."""
        B, T, _ = x.shape
        r = self.receptance(x).view(B, T, self.num_heads, self.head_dim)
        k = self.key(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.value(x).view(B, T, self.num_kv_heads, self.head_dim)
        r, k = head_norm(self.r_norm, r), head_norm(self.k_norm, k)
        if self.use_rope and position_embeddings is not None:
            r, k = rotate_qk(r, k, position_embeddings, self.rope_fn)
        return r, k, v

    def _recurrent(self, x: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   layer_state: dict[str, torch.Tensor] | None, value_residual: bool = True) -> torch.Tensor:
        """The RWKV-7 branch: returns y [B, T, H, D] (gate not applied); updates layer_state["S"]."""
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        n_rep = H // self.num_kv_heads
        k, v = repeat_heads(k, n_rep), repeat_heads(v, n_rep)
        if value_residual:
            v = self._value_residual(v, x)
        log_w = rwkv7_log_decay(self.decay_base + self.decay_lora(x)).view(B, T, H, D)
        a = torch.sigmoid(self.iclr_base + self.iclr_lora(x)).view(B, T, H, D)
        kappa = removal_key(k)
        return self._delta_rule(r, log_w, balanced_key(k, log_w, a), v, kappa, a, layer_state)

    def _value_residual(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The first layer's values pass to the context; later layers mix towards them."""
        if self.first_layer or self.ctx.v_first is None:
            self.ctx.v_first = v
            return v
        return value_residual(v, self.ctx.v_first, (self.value_mix_base + self.value_mix_lora(x)).view(v.shape))

    def _delta_rule(self, r: torch.Tensor, log_w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    kappa: torch.Tensor, a: torch.Tensor, layer_state: dict[str, torch.Tensor] | None
                    ) -> torch.Tensor:
        """The state update over [B, T, H, D] inputs (k: the written key); padding leaves the state untouched: no
        input, no decay, no removal. Returns y [B, T, H, D]; updates layer_state["S"]."""
        mask = self.ctx.token_mask
        if mask is not None:
            m = mask[:, :, None, None].to(k.dtype)
            k, log_w, a = k * m, log_w * m, a * m
        s0 = None if layer_state is None else layer_state["S"]
        y, s = rwkv7_attention(r, log_w, k, v, *delta_rule_terms(kappa, a), scale=self.head_dim**-0.5,
                               initial_state=s0, output_final_state=layer_state is not None,
                               backend=self.ctx.backend)
        if layer_state is not None:
            layer_state["S"] = s
        return y

    def init_state(self, batch_size: int, device: torch.device | None) -> dict[str, torch.Tensor]:
        D = self.head_dim
        return {"S": torch.zeros(batch_size, self.num_heads, D, D, dtype=torch.float32, device=device)}

    def forward(self, hidden_states: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        x = hidden_states
        B, T, _ = x.shape
        r, k, v = self._project(x, position_embeddings)
        y = self._recurrent(x, r, k, v, self.ctx.layer_state(self.layer_idx))
        y = y.reshape(B, T, -1) * (1 + self.gate_lora(x))
        return self.output(y), None


from .modeling_qwerky import QwerkyForCausalLM  # noqa: E402,F401  (exported folders' entry point: mixer_base)
