"""State updates over vLLM's packed batches, in plain PyTorch (no vLLM import: testable without it).

vLLM hands a layer one flat batch of tokens [N, ...]: first the decode requests (one token each), then
the prefill requests (a prompt, or a piece of one under chunked prefill), with `query_start_loc`
giving each request's token range and a state-cache slot per request. The per-sequence state lives in
cache tensors [num_slots, ...] owned by vLLM; these functions read each request's slot, run the mixer's
recurrence (any `Step`: the mixer's own sequence op from qwerky.modeling) and write the slot back in
place. Negative slot ids (padding rows of a CUDA-graph batch) are sent to slot 0, vLLM's null block.

Prefills run as one packed pass: all prefilling requests of the step, their tokens contiguous after the
decodes, go to the mixer's varlen form (`cu_seqlens`; `qwerky.modeling.ops_varlen` in PyTorch, fla's
varlen kernels on CUDA), each from its slot's state or from zero. QWERKY_VLLM_PREFILL=loop runs them one
request at a time instead (the reference the packed pass is tested and benchmarked against).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qwerky.modeling.ops_rwkv7 import rwkv7_attention

# step(inputs [B, T, ...] each, initial states [B, ...] each or None, cu_seqlens or None) -> (output [B, T, ...],
# final states). With cu_seqlens ([S + 1] token offsets): B == 1, S sequences packed along T, states [S, ...].
Step = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor] | None, torch.Tensor | None],
                tuple[torch.Tensor, Sequence[torch.Tensor]]]
PREFILL_MODES = ("packed", "loop")


def prefill_mode() -> str:
    """How a step's prefills run: "packed" (one varlen pass, the default) or "loop" (QWERKY_VLLM_PREFILL=loop)."""
    mode = os.environ.get("QWERKY_VLLM_PREFILL", "packed")
    if mode not in PREFILL_MODES:
        raise ValueError(f"QWERKY_VLLM_PREFILL={mode!r}: expected one of {', '.join(PREFILL_MODES)}")
    return mode


@dataclass(frozen=True)
class PackedBatch:
    """Where each request's tokens and state are in one packed step (vLLM's linear-attention metadata)."""

    num_decodes: int
    num_prefills: int
    query_start_loc: torch.Tensor  # [num_requests + 1] token offsets, decodes first
    state_indices: torch.Tensor  # [num_requests] state slot per request
    has_initial_state: torch.Tensor | None = None  # [num_prefills]: a continued chunked prefill

    @property
    def num_tokens(self) -> int:
        return int(self.query_start_loc[self.num_decodes + self.num_prefills])

    @functools.cached_property
    def prefills(self) -> list[tuple[int, int, int, bool]]:
        """(start, end, slot, continues) per prefill request (read to the host once per batch)."""
        nd, npf = self.num_decodes, self.num_prefills
        bounds = self.query_start_loc[nd:nd + npf + 1].tolist()
        slots = self.state_indices[nd:nd + npf].tolist()
        init = [True] * npf if self.has_initial_state is None else self.has_initial_state.tolist()
        return [(bounds[j], bounds[j + 1], slots[j], bool(init[j])) for j in range(npf)]


def run_packed(step: Step, inputs: Sequence[torch.Tensor], states: Sequence[torch.Tensor], batch: PackedBatch,
               out: torch.Tensor, varlen: bool = True) -> None:
    """Run `step` over a packed batch: all decodes as one batch of one-token sequences, then the prefills
    (each from its slot when it continues, from zero otherwise) as one varlen pass, or one at a time when
    `step` has no varlen form (`varlen=False`) or QWERKY_VLLM_PREFILL=loop; writes `out[:num_tokens]` and
    the slots."""
    nd, npf = batch.num_decodes, batch.num_prefills
    if nd > 0:
        idx = batch.state_indices[:nd].long().clamp(min=0)
        o, finals = step([x[:nd, None] for x in inputs], [s[idx] for s in states], None)
        out[:nd] = o[:, 0]
        for s, f in zip(states, finals):
            s[idx] = f.to(s.dtype)
    if npf == 0:
        return
    if varlen and prefill_mode() == "packed":
        qsl = batch.query_start_loc
        start, end = int(qsl[nd]), batch.num_tokens
        cu = qsl[nd:nd + npf + 1] - qsl[nd]
        slots = batch.state_indices[nd:nd + npf].long().clamp(min=0)
        initial = [s[slots] for s in states]
        if batch.has_initial_state is not None:  # a new request starts from zero (its slot may hold anything)
            keep = batch.has_initial_state.to(slots.device)
            initial = [torch.where(keep.view(-1, *[1] * (s.dim() - 1)), s, torch.zeros_like(s)) for s in initial]
        o, finals = step([x[None, start:end] for x in inputs], initial, cu)
        out[start:end] = o[0]
        for s, f in zip(states, finals):
            s[slots] = f.to(s.dtype)
        return
    for start, end, slot, continues in batch.prefills:
        if end <= start:
            continue
        slot = max(slot, 0)
        initial = [s[slot][None] for s in states] if continues else None
        o, finals = step([x[None, start:end] for x in inputs], initial, None)
        out[start:end] = o[0]
        for s, f in zip(states, finals):
            s[slot] = f[0].to(s.dtype)


def token_shift_packed(x: torch.Tensor, shift_state: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """The previous token's input for every row of a packed batch (RWKV's token shift): a request's first
    row gets its slot's saved row (zero for a new request), the others the row before; each slot then
    keeps its request's last row. x [N, C], shift_state [num_slots, C]; returns x_prev [N, C]."""
    x_prev = torch.zeros_like(x)
    nd = batch.num_decodes
    if nd > 0:
        idx = batch.state_indices[:nd].long().clamp(min=0)
        x_prev[:nd] = shift_state[idx].to(x.dtype)
        shift_state[idx] = x[:nd].to(shift_state.dtype)
    for start, end, slot, continues in batch.prefills:
        if end <= start:
            continue
        slot = max(slot, 0)
        if continues:
            x_prev[start] = shift_state[slot].to(x.dtype)
        x_prev[start + 1:end] = x[start:end - 1]
        shift_state[slot] = x[end - 1].to(shift_state.dtype)
    return x_prev


def rwkv7_packed(
    r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    state: torch.Tensor, batch: PackedBatch, scale: float, backend: str = "auto",
) -> torch.Tensor:
    """RWKV-7 over a packed batch: r, w, k, a, b [N, H, K], v [N, H, V]; returns o [N, H, V] (v's dtype).
    state [num_slots, H, K, V] (fp32 normally) is read and written per request."""

    def step(xs: Sequence[torch.Tensor], s0: Sequence[torch.Tensor] | None, cu_seqlens: torch.Tensor | None):
        o, s = rwkv7_attention(*xs, scale=scale, initial_state=None if s0 is None else s0[0].float(),
                               output_final_state=True, backend=backend, cu_seqlens=cu_seqlens)
        return o, [s]

    o = v.new_zeros(v.shape)
    run_packed(step, (r, w, k, v, a, b), [state], batch, o)
    return o
