"""Gated DeltaNet student (Yang et al. 2024): the gated delta rule in place of a teacher attention block.

Initialised from the teacher attention: q->query, k->key, v->value, o->output (biases and Qwen3 q/k
norms kept, GQA key/value heads repeated to the query heads, the teacher's RoPE applied to q and k
before their L2 normalisation). Per head, with one decay and one write strength per token:

    alpha = exp(g),  g = -5 * sigmoid(g0 + x Wg)               per-head decay in [e^-5, 1]
    beta  = sigmoid(b0 + x Wb)                                   delta-rule write strength
    S <- alpha S,  then  S <- S + beta k (v - S^T k)^T           (state [K, V] fp32, see ops_gated_deltanet)
    y = (S^T q) * (1 + sigmoid(x G1) G2), then the teacher's o_proj

With q and k of unit length, reading the state at a stored key returns its value at full scale, as an
attention head returning one value would, so no output norm is needed and the teacher's o_proj fits. The
heads' decays start spread from slow (spans of hundreds of tokens) to fast; the gate starts at one.

Copied into every exported model folder: imports nothing from qwerky.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers_common import LowRank, family_rope, head_norm, repeat_heads, rotate_qk, take_projections
from .mixer_base import Mixer, MixerOptions, register_mixer
from .ops_gated_deltanet import gated_delta_rule

MAX_DECAY_RATE = 5.0  # g >= -5 per token: the range the op suite checks


@register_mixer
class GatedDeltaNetMixer(Mixer):
    """Replaces one attention block; takes over the teacher attention's projection modules."""

    name = "gated_deltanet"
    Options = MixerOptions
    description = "Gated DeltaNet: delta rule with one data-dependent decay and write strength per head"

    def __init__(self, config: Any, layer_idx: int, attention: nn.Module, first_layer: bool,
                 options: MixerOptions) -> None:
        super().__init__(config, layer_idx, attention, first_layer, options)
        C, H = config.hidden_size, self.num_heads
        take_projections(self, attention)
        self.rope_fn = family_rope(attention)
        self.decay_proj = nn.Linear(C, H)  # g logits, one per head
        self.beta_proj = nn.Linear(C, H)
        self.gate_lora = LowRank(C, config.gate_rank, H * self.head_dim, activation="sigmoid")

    @torch.no_grad()
    def reset_new_parameters(self) -> None:
        self.decay_proj.weight.zero_()
        # per-head decay rates 5 * sigmoid(b) from 0.0017 (a span of ~600 tokens) to 2.5 (the current token)
        self.decay_proj.bias.copy_(torch.linspace(-8.0, 0.0, self.num_heads))
        self.beta_proj.weight.zero_()
        self.beta_proj.bias.zero_()  # beta = 0.5
        self.gate_lora.reset_parameters()

    def init_state(self, batch_size: int, device: torch.device | str | None) -> dict[str, torch.Tensor]:
        D = self.head_dim
        return {"S": torch.zeros(batch_size, self.num_heads, D, D, dtype=torch.float32, device=device)}

    def forward(self, hidden_states: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        x = hidden_states
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        q = head_norm(self.r_norm, self.receptance(x).view(B, T, H, D))
        k = head_norm(self.k_norm, self.key(x).view(B, T, self.num_kv_heads, D))
        v = self.value(x).view(B, T, self.num_kv_heads, D)
        if self.use_rope and position_embeddings is not None:
            q, k = rotate_qk(q, k, position_embeddings, self.rope_fn)
        n_rep = H // self.num_kv_heads
        k, v = repeat_heads(k, n_rep), repeat_heads(v, n_rep)
        q = F.normalize(q.float(), dim=-1).to(v.dtype)
        k = F.normalize(k.float(), dim=-1).to(v.dtype)
        g = -MAX_DECAY_RATE * torch.sigmoid(self.decay_proj(x).float())
        beta = torch.sigmoid(self.beta_proj(x).float())
        mask = self.ctx.token_mask
        if mask is not None:  # padding leaves the state untouched: no decay, no write
            m = mask.to(g.dtype)
            g, beta = g * m[..., None], beta * m[..., None]
        layer_state = self.ctx.layer_state(self.layer_idx)
        s0 = None if layer_state is None else layer_state["S"]
        y, s = gated_delta_rule(q, k, v, g, beta, scale=1.0, initial_state=s0,
                                output_final_state=layer_state is not None, backend=self.ctx.backend)
        if layer_state is not None:
            layer_state["S"] = s
        y = y.reshape(B, T, H * D) * (1 + self.gate_lora(x))
        return self.output(y), None


from .modeling_qwerky import QwerkyForCausalLM  # noqa: E402,F401  (exported folders' entry point: mixer_base)
