"""Stage 1's side channel: each mixer's output is taken for the loss and the teacher's is passed on.

Stage 1 trains every mixer at once, each against its own teacher attention block fed the teacher's own
input. One student forward does it if, at every converted layer, the teacher's attention output goes
down the residual stream instead of the mixer's: then no error accumulates from layer to layer. A
forward hook on each mixer does the swap, so the model code knows nothing of training.

The hook returns (teacher output, mixer output): decoder layers keep the first item and drop the
second, like HF attention weights, but the mixer's output stays part of the mixer module's output, so
FSDP2's hooks on a sharded mixer see the tensor whose gradient reaches its parameters.

`checkpoint_forward` recomputes each mixer in backward (activation checkpointing applied from outside, like
torchtitan's `apply_ac`): without it a stage-1 step keeps every mixer's chunked-recurrence activations at
once (SmolLM2-135M at 8 x 512 tokens: over 20 GB), with it one mixer's at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


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


def call_mixer(mixer: nn.Module, forward: Callable[..., Any], x: torch.Tensor, rope: Any,
               v_first: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One mixer forward with the shared value-residual source passed in and out explicitly (not read from
    the forward context), so a recomputation in backward sees exactly what the first pass saw."""
    ctx = mixer.ctx
    ctx.v_first = v_first
    out = forward(x, position_embeddings=rope, **kwargs)
    return (out[0] if isinstance(out, tuple) else out), ctx.v_first


@contextmanager
def checkpoint_forward(mixers: Sequence[nn.Module]) -> Iterator[None]:
    """Within the block, each mixer's forward is recomputed in backward instead of keeping its activations
    (torch.utils.checkpoint, non-reentrant). Applied to the module instances, not in the model code; the
    module's own hooks (FSDP2's, `AlignmentTap`'s) still run around it once."""
    def wrap(mixer: nn.Module) -> Callable[..., Any]:
        inner = mixer.forward

        def forward(hidden_states: torch.Tensor, position_embeddings: Any = None, **kwargs: Any) -> Any:
            if not (torch.is_grad_enabled() and any(p.requires_grad for p in mixer.parameters())):
                return inner(hidden_states, position_embeddings=position_embeddings, **kwargs)
            y, v_first = checkpoint(call_mixer, mixer, inner, hidden_states, position_embeddings,
                                    mixer.ctx.v_first, use_reentrant=False, **kwargs)
            mixer.ctx.v_first = v_first
            return y, None
        return forward

    for m in mixers:
        m.forward = wrap(m)
    try:
        yield
    finally:
        for m in mixers:
            del m.forward
