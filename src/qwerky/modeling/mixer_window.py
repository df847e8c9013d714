"""Windowed student: exact local softmax attention plus an RWKV-7 state for everything older.

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
Decoding keeps W + S keys/values per layer and the fixed-size state: memory per sequence is bounded.

Copied into every exported model folder: imports nothing from qwerky.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .layers_common import rotate_qk
from .mixer_base import MixerOptions, option, register_mixer
from .mixer_rwkv7 import RWKV7Mixer
from .ops_window import CACHE_PAD_VALUES, empty_cache, window_attention


@dataclass
class WindowOptions(MixerOptions):
    window_size: int = option(64, "latest tokens (the current one included) seen by exact softmax attention")
    num_sinks: int = option(4, "first tokens of the sequence every query always sees (attention sinks)")
    branch_rope: bool = option(False, "rotate the RWKV-7 branch's r/k with RoPE too; off, the state holds no "
                                      "positions and what it learned at the training length holds past it")
    branch_decay_init: tuple[float, float] = option((-9.0, -3.0), "(lowest, highest) starting decay logit of "
                                                    "the branch's channels: slow, since the window covers the "
                                                    "recent tokens")
    branch_center_keys: bool = option(True, "the branch reads with keys minus their mean on the training text "
                                            "(set before training): softmax ignores what all keys share, a "
                                            "linear state does not")

    def check(self) -> None:
        if self.window_size < 1 or self.num_sinks < 0:
            raise ValueError(f"window_size must be >= 1 and num_sinks >= 0, got {self.window_size}, {self.num_sinks}")
        lo, hi = self.branch_decay_init
        if lo > hi:
            raise ValueError(f"branch_decay_init must be (lowest, highest), got {list(self.branch_decay_init)}")


@register_mixer
class WindowMixer(RWKV7Mixer):
    """Sliding-window + sink softmax attention plus a zero-gated RWKV-7 branch."""

    name = "window"
    Options = WindowOptions
    state_pad_values: ClassVar[dict[str, int]] = CACHE_PAD_VALUES
    description = "exact softmax over the last 64 tokens + 4 sinks, plus an RWKV-7 state for all older tokens"
    fits_output_scale = False  # it starts exactly at the window baseline: nothing to rescale

    def __init__(self, config: Any, layer_idx: int, attention: nn.Module, first_layer: bool,
                 options: WindowOptions) -> None:
        super().__init__(config, layer_idx, attention, first_layer, options)
        self.window_size, self.num_sinks = options.window_size, options.num_sinks
        self.branch_rope = options.branch_rope
        self.scaling = config.attention_scaling
        self.window_scale = nn.Parameter(torch.empty(self.num_heads))
        self.branch_gate = nn.Parameter(torch.empty(self.num_heads * self.head_dim))
        # the mean branch key of real text, set by `calibrate` before training
        self.key_offset = (nn.Parameter(torch.empty(self.num_kv_heads * self.head_dim))
                           if options.branch_center_keys else None)

    def decay_init(self) -> torch.Tensor:
        return torch.linspace(*self.options.branch_decay_init, self.head_dim).repeat(self.num_heads)

    @torch.no_grad()
    def reset_new_parameters(self) -> None:
        super().reset_new_parameters()
        self.window_scale.fill_(1.0)
        self.branch_gate.zero_()  # the student starts as the window baseline exactly
        if self.key_offset is not None:
            self.key_offset.zero_()

    @torch.no_grad()
    def calibrate(self, hidden_states: torch.Tensor) -> bool:
        """Centre the branch's keys: key_offset = their mean (normed, unrotated) over this real text."""
        if self.key_offset is None:
            return False
        _, k, _ = self._project(hidden_states, None)
        self.key_offset.copy_(k.float().mean(dim=(0, 1)).reshape(-1).to(self.key_offset.dtype))
        return True

    def init_state(self, batch_size: int, device: torch.device | str | None) -> dict[str, torch.Tensor]:
        state = super().init_state(batch_size, device)
        state.update(empty_cache(batch_size, self.num_kv_heads, self.head_dim, self.window_size,
                                 self.num_sinks, self.receptance.weight.dtype, device))
        return state

    def forward(self, hidden_states: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        x = hidden_states
        B, T, _ = x.shape
        r0, k0, v = self._project(x, None)  # normed, not rotated
        r, k = r0, k0
        if self.use_rope and position_embeddings is not None:
            r, k = rotate_qk(r0, k0, position_embeddings, self.rope_fn)
        layer_state = self.ctx.layer_state(self.layer_idx)
        local = window_attention(r, k, v, self.ctx.positions_for(B, T, x.device), self.scaling, self.window_size,
                                 self.num_sinks, cache=layer_state)
        y = (local * self.window_scale[None, None, :, None].to(local.dtype)).reshape(B, T, -1)
        r_b, k_b = r0, k0
        if self.key_offset is not None:  # centred before any rotation: the offset is a mean unrotated key
            k_b = k_b - self.key_offset.view(self.num_kv_heads, self.head_dim).to(k_b.dtype)
        if self.branch_rope and self.use_rope and position_embeddings is not None:
            r_b, k_b = rotate_qk(r_b, k_b, position_embeddings, self.rope_fn)
        branch = self._recurrent(x, r_b, k_b, v, layer_state, value_residual=False).reshape(B, T, -1)
        y = y + self.branch_gate.to(y.dtype) * branch * (1 + self.gate_lora(x))
        return self.output(y), None


from .modeling_qwerky import QwerkyForCausalLM  # noqa: E402,F401  (exported folders' entry point: mixer_base)
