"""Windowed student (exact local softmax + RWKV-7 state) and the kept full attention of hybrid layers.

WindowMixer: in every converted layer, exact softmax attention with the teacher's own q/k/v over the
last `window_size` tokens plus `num_sinks` sink tokens, plus the RWKV-7 branch over all tokens:

    y = window_scale[h] * softmax_window(q, k, v) + branch_gate * rwkv7(r=q, k, v)

`branch_gate` (per channel) starts at zero and `window_scale` at one, so at initialisation the student
equals the teacher restricted to the window exactly (the training-free baseline), and training can only
start from there. The per-head scale lets training undo the over-weighting of in-window tokens that a
window-normalised softmax causes (the calibration in method.md found it helped most).

The branch's job is what lies beyond the window, often beyond the training length, so (config):
  - its r/k skip RoPE: a state holding no positions cannot meet a distance it never saw;
  - its decays start slow: the window already covers the recent tokens;
  - it reads with centred keys (`key_offset`, the mean key of real text): softmax ignores whatever all
    keys share, a linear state does not, and a shared component drowns its reads;
  - optionally its own copies of the receptance/key projections: shared ones are shaped by the window's
    gradient, which dwarfs the zero-gated branch's.
Decoding keeps W + S keys/values per layer and the fixed-size state: memory per sequence is bounded.

AttentionMixer: the teacher's full causal attention, for hybrid layers; its cache grows with the context.

Copied into every exported model folder: imports nothing from qwerky.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .layers_common import family_rope, head_norm, rotate_qk
from .mixer_rwkv7 import ForwardContext, RWKV7Mixer
from .ops_window import empty_cache, window_attention


class WindowMixer(RWKV7Mixer):
    """Sliding-window + sink softmax attention plus a zero-gated RWKV-7 branch."""

    def __init__(self, config: Any, layer_idx: int, attention: nn.Module, first_layer: bool) -> None:
        super().__init__(config, layer_idx, attention, first_layer)
        self.window_size, self.num_sinks = config.window_size, config.num_sinks
        self.scaling = config.attention_scaling
        self.window_scale = nn.Parameter(torch.ones(self.num_heads))
        self.branch_gate = nn.Parameter(torch.zeros(self.num_heads * self.head_dim))
        self.branch_rope = getattr(config, "branch_rope", True)
        self.branch_decay_init = tuple(getattr(config, "branch_decay_init", (-5.0, 1.0)))
        if getattr(config, "branch_own_qk", False):  # copies of receptance/key, trained by the branch alone
            self.branch_receptance = copy.deepcopy(self.receptance)
            self.branch_key = copy.deepcopy(self.key)
        else:
            self.branch_receptance = self.branch_key = None
        if getattr(config, "branch_center_keys", False):  # set from data by qwerky.surgery.calibrate
            self.key_offset = nn.Parameter(torch.zeros(self.num_kv_heads * self.head_dim))
        else:
            self.key_offset = None
        with torch.no_grad():
            self.decay_base.copy_(self._decay_init())

    def _decay_init(self) -> torch.Tensor:
        return torch.linspace(*self.branch_decay_init, self.head_dim).repeat(self.num_heads)

    @torch.no_grad()
    def reset_new_parameters(self) -> None:
        super().reset_new_parameters()
        self.decay_base.copy_(self._decay_init())
        self.window_scale.fill_(1.0)
        self.branch_gate.zero_()
        if self.key_offset is not None:
            self.key_offset.zero_()
        if self.branch_key is not None:
            self.branch_receptance.load_state_dict(self.receptance.state_dict())
            self.branch_key.load_state_dict(self.key.state_dict())

    def branch_rk(self, x: torch.Tensor, r0: torch.Tensor | None = None, k0: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The branch's receptance and key [B, T, H|Hk, D]: normed, not rotated, not centred. Its own
        projections when it has them, else the window's (r0/k0, computed here if not given)."""
        B, T, _ = x.shape
        if self.branch_key is None:
            if r0 is None or k0 is None:
                r0, k0, _ = self._project(x, None)
            return r0, k0
        r = self.branch_receptance(x).view(B, T, self.num_heads, self.head_dim)
        k = self.branch_key(x).view(B, T, self.num_kv_heads, self.head_dim)
        return head_norm(self.r_norm, r), head_norm(self.k_norm, k)

    def init_state(self, batch_size: int, device: torch.device | None) -> dict[str, torch.Tensor]:
        state = super().init_state(batch_size, device)
        state.update(empty_cache(batch_size, self.num_kv_heads, self.head_dim, self.window_size,
                                 self.num_sinks, self.receptance.weight.dtype, device))
        return state

    def forward(self, hidden_states: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: Any = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = hidden_states
        B, T, _ = x.shape
        r0, k0, v = self._project(x, None)  # normed, not rotated
        r, k = r0, k0
        if self.use_rope and position_embeddings is not None:
            r, k = rotate_qk(r0, k0, position_embeddings, self.rope_fn)
        layer_state = self.ctx.layer_state(self.layer_idx)
        positions = _positions(self.ctx, B, T, x.device)
        local = window_attention(r, k, v, positions, self.scaling, self.window_size, self.num_sinks,
                                 cache=layer_state)
        y = local * self.window_scale[None, None, :, None].to(local.dtype)
        y = y.reshape(B, T, -1)
        r_b, k_b = self.branch_rk(x, r0, k0)
        if self.key_offset is not None:  # centred before any rotation: the offset is a mean unrotated key
            k_b = k_b - self.key_offset.view(self.num_kv_heads, self.head_dim).to(k_b.dtype)
        if self.branch_rope and self.use_rope and position_embeddings is not None:
            r_b, k_b = rotate_qk(r_b, k_b, position_embeddings, self.rope_fn)
        branch = self._recurrent(x, r_b, k_b, v, layer_state, value_residual=False).reshape(B, T, -1)
        y = y + self.branch_gate.to(y.dtype) * branch * (1 + self.gate_lora(x))
        return self.ctx.emit(self.layer_idx, self.output(y))


class AttentionMixer(nn.Module):
    """The teacher's own full causal attention (hybrid layers), with a growing key/value cache."""

    def __init__(self, config: Any, layer_idx: int, attention: nn.Module) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.scaling = config.attention_scaling
        self.q_proj, self.k_proj, self.v_proj = attention.q_proj, attention.k_proj, attention.v_proj
        self.o_proj = getattr(attention, "o_proj", None) or attention.dense
        self.q_norm = getattr(attention, "q_norm", None)
        self.k_norm = getattr(attention, "k_norm", None)
        self.rope_fn = family_rope(attention)
        self.ctx = ForwardContext()

    def reset_new_parameters(self) -> None:
        return  # everything here is the teacher's

    def init_state(self, batch_size: int, device: torch.device | None) -> dict[str, torch.Tensor]:
        return empty_cache(batch_size, self.num_kv_heads, self.head_dim, None, 0,
                           self.q_proj.weight.dtype, device)

    def forward(self, hidden_states: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: Any = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = hidden_states
        B, T, _ = x.shape
        q = head_norm(self.q_norm, self.q_proj(x).view(B, T, self.num_heads, self.head_dim))
        k = head_norm(self.k_norm, self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if position_embeddings is not None:
            q, k = rotate_qk(q, k, position_embeddings, self.rope_fn)
        positions = _positions(self.ctx, B, T, x.device)
        y = window_attention(q, k, v, positions, self.scaling, None, 0,
                             cache=self.ctx.layer_state(self.layer_idx))
        return self.o_proj(y.reshape(B, T, -1)), None


def _positions(ctx: ForwardContext, B: int, T: int, device: torch.device) -> torch.Tensor:
    if ctx.positions is not None:
        return ctx.positions
    return torch.arange(T, device=device).expand(B, T)
