"""QwerkyState: the per-sequence state of a converted model, fixed in size whatever the context length.

Each layer holds the dict of tensors its mixer's `init_state` declares, first dimension the batch row
(e.g. RWKV-7: S [B, H, D, D] fp32; the window mixer adds a ring of the last W keys/values and the sinks).
The kept attention of hybrid layers holds k, v [B, L, Hk, D] and kpos [B, L]; L grows with the context.
Rows may sit at different positions (continuous batching); `position` counts real tokens per row.

Copied into every exported model folder: imports nothing from qwerky.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class QwerkyState:
    """Recurrent state of a batch of sequences; see the module docstring for the layout."""

    is_compileable = False

    def __init__(self, layers: list[dict[str, torch.Tensor]], position: torch.Tensor, seen: int = 0,
                 pad_values: list[dict[str, int]] | None = None) -> None:
        self.layers = layers
        # per layer, the fill of a growing tensor's padded slots when rows are stacked (the mixer declares it)
        self.pad_values = pad_values if pad_values is not None else [{} for _ in layers]
        self.position = position  # [B] real tokens consumed per row
        self.seen = seen  # input columns consumed (padding included); used by generate()

    @property
    def batch_size(self) -> int:
        return int(self.position.shape[0])

    def nbytes(self) -> int:
        """Bytes held by all tensors of the state."""
        total = self.position.numel() * self.position.element_size()
        for layer in self.layers:
            total += sum(t.numel() * t.element_size() for t in layer.values())
        return total

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.position.max().item()) if self.position.numel() else 0

    def clone(self) -> QwerkyState:
        return QwerkyState([{k: t.clone() for k, t in layer.items()} for layer in self.layers],
                           self.position.clone(), self.seen, self.pad_values)

    def select(self, index: Sequence[int] | torch.Tensor) -> QwerkyState:
        """A new state holding the given rows (copied)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.position.device)
        return QwerkyState([{k: t.index_select(0, idx.to(t.device)) for k, t in layer.items()}
                            for layer in self.layers], self.position.index_select(0, idx), self.seen, self.pad_values)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """In-place row reorder (beam search)."""
        new = self.select(beam_idx)
        self.layers, self.position = new.layers, new.position

    @staticmethod
    def stack(states: Sequence[QwerkyState]) -> QwerkyState:
        """Concatenate the rows of several states of the same model (growing attention caches are left-padded)."""
        if not states:
            raise ValueError("QwerkyState.stack needs at least one state")
        layers = []
        pad_values = states[0].pad_values
        for parts, fills in zip(zip(*(s.layers for s in states)), pad_values):
            layer = {}
            for key in parts[0]:
                tensors = [p[key] for p in parts]
                longest = max(t.shape[1] for t in tensors) if tensors[0].dim() > 1 else 0
                if tensors[0].dim() > 1 and any(t.shape[1] != longest for t in tensors):
                    tensors = [_left_pad(t, longest, fills.get(key, 0)) for t in tensors]
                layer[key] = torch.cat(tensors, dim=0)
            layers.append(layer)
        return QwerkyState(layers, torch.cat([s.position for s in states]), max(s.seen for s in states), pad_values)


def _left_pad(t: torch.Tensor, length: int, fill: int) -> torch.Tensor:
    pad = length - t.shape[1]
    if pad == 0:
        return t
    shape = (t.shape[0], pad, *t.shape[2:])
    return torch.cat([torch.full(shape, fill, dtype=t.dtype, device=t.device), t], dim=1)
