"""Data-dependent initialisation of the window student's branch: centred keys.

Softmax attention ignores any vector added to every key (it shifts all scores of a query equally), so a
teacher's keys are free to share a large common component, and they do: measured on a small Qwen2
teacher, keys in its middle layers had a mean pairwise cosine of 0.8-0.86. A linear-attention state does
not ignore it: every read returns mostly the average value, and the delta rule's removal (along the
normalised key) erases the state along that shared direction at every token. Subtracting the mean key
(measured here, on the user's own training text) leaves the softmax branch untouched and gives the
recurrent branch keys that differ from token to token (mean cosine 0.00 after centring on that teacher).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


@torch.no_grad()
def center_branch_keys(student: nn.Module, input_ids: torch.Tensor) -> int:
    """Set each window mixer's `key_offset` to the mean of its branch keys (normed, unrotated) over
    `input_ids` [B, T]. Returns how many mixers were set (0 when the student has no centred branch)."""
    mixers = [m for m in getattr(student, "mixers", []) if getattr(m, "key_offset", None) is not None]
    if not mixers:
        return 0
    means: dict[int, torch.Tensor] = {}

    def capture(mixer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        _, k = mixer.branch_rk(x)
        means[id(mixer)] = k.float().mean(dim=(0, 1)).reshape(-1)

    handles = [m.register_forward_pre_hook(capture, with_kwargs=True) for m in mixers]
    try:
        device = next(student.parameters()).device
        student(input_ids.to(device))
    finally:
        for h in handles:
            h.remove()
    for m in mixers:
        m.key_offset.copy_(means[id(m)].to(m.key_offset.dtype))
    return len(mixers)
