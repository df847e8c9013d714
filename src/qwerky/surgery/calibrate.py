"""Data-dependent initialisation of new mixer parameters, from the teacher's stream on the user's text.

Some mixers start better when a parameter is measured rather than set: the window student's branch
reads with centred keys (`WindowMixer.calibrate`: softmax ignores a component all keys share, a linear
state does not, and on a small Qwen2 teacher keys in its middle layers had a mean pairwise cosine of
0.8-0.86). This runs the student once and hands each mixer the input of its own layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qwerky.modeling.mixer_base import Mixer


@torch.no_grad()
def calibrate_mixers(student: nn.Module, input_ids: torch.Tensor) -> int:
    """Run `student` on `input_ids` [B, T] and call every mixer's `calibrate` with its layer's input
    (mixers without one do nothing). Returns how many mixers calibrated something."""
    done: list[bool] = []

    def hook(mixer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        done.append(bool(mixer.calibrate(args[0] if args else kwargs["hidden_states"])))

    mixers = [m for m in getattr(student, "mixers", []) if type(m).calibrate is not Mixer.calibrate]
    if not mixers:
        return 0
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in mixers]
    try:
        student(input_ids.to(next(student.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return sum(done)
