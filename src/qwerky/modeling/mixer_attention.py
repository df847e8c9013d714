"""The teacher's own full causal attention, for the layers a hybrid keeps (not a registered student).

Its key/value cache grows with the context: a hybrid trades some of the fixed-size state for exactness
in the layers where converting costs the most.

Copied into every exported model folder: imports nothing from qwerky.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .layers_common import family_rope, head_norm, rotate_qk
from .mixer_base import Mixer, MixerOptions
from .ops_window import CACHE_PAD_VALUES, empty_cache, window_attention


class AttentionMixer(Mixer):
    """Full causal softmax attention with the teacher's q/k/v/o (their names kept) and a growing cache."""

    name = "attention"
    state_pad_values: ClassVar[dict[str, int]] = CACHE_PAD_VALUES

    def __init__(self, config: Any, layer_idx: int, attention: nn.Module, first_layer: bool = False,
                 options: MixerOptions | None = None) -> None:
        super().__init__(config, layer_idx, attention, first_layer, options or MixerOptions())
        self.scaling = config.attention_scaling
        self.q_proj, self.k_proj, self.v_proj = attention.q_proj, attention.k_proj, attention.v_proj
        self.o_proj = getattr(attention, "o_proj", None) or attention.dense
        self.q_norm = getattr(attention, "q_norm", None)
        self.k_norm = getattr(attention, "k_norm", None)
        self.rope_fn = family_rope(attention)

    def init_state(self, batch_size: int, device: torch.device | str | None) -> dict[str, torch.Tensor]:
        return empty_cache(batch_size, self.num_kv_heads, self.head_dim, None, 0, self.q_proj.weight.dtype, device)

    def forward(self, hidden_states: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        x = hidden_states
        B, T, _ = x.shape
        q = head_norm(self.q_norm, self.q_proj(x).view(B, T, self.num_heads, self.head_dim))
        k = head_norm(self.k_norm, self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if position_embeddings is not None:
            q, k = rotate_qk(q, k, position_embeddings, self.rope_fn)
        y = window_attention(q, k, v, self.ctx.positions_for(B, T, x.device), self.scaling, None, 0,
                             cache=self.ctx.layer_state(self.layer_idx))
        return self.o_proj(y.reshape(B, T, -1)), None
