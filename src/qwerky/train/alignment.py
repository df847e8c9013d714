"""Stage 1's side channel: each mixer's output is taken for the loss and the teacher's is passed on.

Stage 1 trains every mixer at once, each against its own teacher attention block fed the teacher's own
input. One student forward does it if, at every converted layer, the teacher's attention output goes
down the residual stream instead of the mixer's: then no error accumulates from layer to layer. A
forward hook on each mixer does the swap, so the model code knows nothing of training.

The hook returns (teacher output, mixer output): decoder layers keep the first item and drop the
second, like HF attention weights, but the mixer's output stays part of the mixer module's output, so
FSDP2's hooks on a sharded mixer see the tensor whose gradient reaches its parameters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class AlignmentTap:
    """Forward hooks that swap each mixer's output for its layer's target and record the pair."""

    def __init__(self, mixers: Sequence[nn.Module]) -> None:
        self.mixers = list(mixers)

    @contextmanager
    def feeding(self, targets: dict[int, torch.Tensor]) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Within the block, mixer `i` hands on `targets[i]`; yields the (mixer output, target) pairs,
        complete when the block ends (checked: one per mixer)."""
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

        def hook(mixer: nn.Module, args: tuple[Any, ...], output: Any) -> tuple[torch.Tensor, torch.Tensor]:
            own = output[0] if isinstance(output, tuple) else output
            target = targets[mixer.layer_idx]
            pairs.append((own, target))
            return target, own

        missing = [m.layer_idx for m in self.mixers if m.layer_idx not in targets]
        if missing:
            raise RuntimeError(f"stage 1: no teacher attention output recorded for layers {missing}")
        handles = [m.register_forward_hook(hook) for m in self.mixers]
        try:
            yield pairs
        finally:
            for h in handles:
                h.remove()
        if len(pairs) != len(self.mixers):
            raise RuntimeError(f"stage 1 saw {len(pairs)} mixer outputs, expected {len(self.mixers)}")
