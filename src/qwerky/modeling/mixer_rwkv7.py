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
from .ops_rwkv7 import rwkv7_attention

LOG_DECAY_SCALE = math.exp(-0.5)


class ForwardContext:
    """What one forward pass shares across layers (set by QwerkyForCausalLM, empty for standalone use)."""

    def __init__(self) -> None:
        self.state: Any = None  # QwerkyState or None (parallel form from an empty state)
        self.token_mask: torch.Tensor | None = None  # [B, T] bool, False = padding
        self.positions: torch.Tensor | None = None  # [B, T] absolute positions, -1 = padding
        self.v_first: torch.Tensor | None = None  # layer-0 values for the value residual
        self.backend: str = "auto"
        # stage 1 (attention alignment): the teacher's attention outputs per layer; when set, each mixer
        # records (its output, the target) and hands the target on, so every layer sees the teacher's stream
        self.align_targets: dict[int, torch.Tensor] | None = None
        self.align_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def layer_state(self, layer_idx: int) -> dict[str, torch.Tensor] | None:
        return None if self.state is None else self.state.layers[layer_idx]

    def emit(self, layer_idx: int, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a mixer returns to its decoder layer: (stream tensor, extra) like HF's (output, weights).

        In stage 1 the stream gets the teacher's output and the mixer's own output rides in the second
        slot, which decoder layers discard; returning it keeps it a module output, so FSDP2's backward
        hooks see it."""
        if self.align_targets is None:
            return output, None
        target = self.align_targets[layer_idx]
        self.align_pairs.append((output, target))
        return target, output


class RWKV7Mixer(nn.Module):
    """Replaces one attention block; takes over the teacher attention's projection modules."""

    def __init__(self, config: Any, layer_idx: int, attention: nn.Module, first_layer: bool) -> None:
        super().__init__()
        C, H, D = config.hidden_size, config.num_heads, config.head_dim
        self.layer_idx, self.first_layer = layer_idx, first_layer
        self.num_heads, self.num_kv_heads, self.head_dim = H, config.num_kv_heads, D
        self.use_rope = config.use_rope
        self.chunk_size = config.chunk_size
        take_projections(self, attention)
        self.rope_fn = family_rope(attention)
        self.decay_base = nn.Parameter(torch.linspace(-5.0, 1.0, D).repeat(H))
        self.decay_lora = LowRank(C, config.decay_rank, H * D)
        self.iclr_base = nn.Parameter(torch.zeros(H * D))
        self.iclr_lora = LowRank(C, config.iclr_rank, H * D, activation="none")
        if not first_layer:
            self.value_mix_base = nn.Parameter(torch.full((H * D,), -3.0))
            self.value_mix_lora = LowRank(C, config.value_rank, H * D, activation="none")
        self.gate_lora = LowRank(C, config.gate_rank, H * D, activation="sigmoid")
        self.ctx = ForwardContext()

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
            if self.first_layer or self.ctx.v_first is None:
                self.ctx.v_first = v
            else:
                mix = torch.sigmoid(self.value_mix_base + self.value_mix_lora(x)).view(B, T, H, D)
                v = v + (self.ctx.v_first - v) * mix
        log_w = -LOG_DECAY_SCALE * torch.sigmoid(self.decay_base + self.decay_lora(x)).view(B, T, H, D)
        a = torch.sigmoid(self.iclr_base + self.iclr_lora(x)).view(B, T, H, D)
        kappa = F.normalize(k.float(), dim=-1).to(k.dtype)
        k_in = k * (1 - log_w.exp() + a)
        mask = self.ctx.token_mask
        if mask is not None:  # padding leaves the state untouched: no input, no decay, no removal
            m = mask[:, :, None, None].to(k_in.dtype)
            k_in, log_w, a = k_in * m, log_w * m, a * m
        s0 = None if layer_state is None else layer_state["S"]
        y, s = rwkv7_attention(r, log_w, k_in, v, -kappa, kappa * a, scale=D**-0.5, initial_state=s0,
                               output_final_state=layer_state is not None, backend=self.ctx.backend)
        if layer_state is not None:
            layer_state["S"] = s
        return y

    @torch.no_grad()
    def reset_new_parameters(self) -> None:
        """(Re)initialise the parameters the teacher did not have (used after meta-device surgery)."""
        H, D = self.num_heads, self.head_dim
        self.decay_base.copy_(torch.linspace(-5.0, 1.0, D).repeat(H))
        self.decay_lora.reset_parameters()
        self.iclr_base.zero_()
        self.iclr_lora.reset_parameters()
        if not self.first_layer:
            self.value_mix_base.fill_(-3.0)
            self.value_mix_lora.reset_parameters()
        self.gate_lora.reset_parameters()

    def init_state(self, batch_size: int, device: torch.device | None) -> dict[str, torch.Tensor]:
        D = self.head_dim
        return {"S": torch.zeros(batch_size, self.num_heads, D, D, dtype=torch.float32, device=device)}

    def forward(self, hidden_states: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: Any = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = hidden_states
        B, T, _ = x.shape
        r, k, v = self._project(x, position_embeddings)
        y = self._recurrent(x, r, k, v, self.ctx.layer_state(self.layer_idx))
        y = y.reshape(B, T, -1) * (1 + self.gate_lora(x))
        return self.ctx.emit(self.layer_idx, self.output(y))
