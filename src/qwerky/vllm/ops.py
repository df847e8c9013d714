"""Recurrences over vLLM's packed batches, in plain PyTorch (no vLLM import: testable without it).

vLLM hands a layer one flat batch of tokens [N, ...]: first the decode requests (one token each), then
the prefill requests (a prompt, or a piece of one under chunked prefill), with `query_start_loc`
giving each request's token range and a state-cache slot per request. The per-sequence state lives in a
cache tensor [num_slots, ...] owned by vLLM; these functions read each request's slot, run the
recurrence and write the slot back in place.
"""

from __future__ import annotations

import torch

from qwerky.modeling.ops_rwkv7 import rwkv7_attention


def rwkv7_packed(
    r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    state: torch.Tensor, state_indices: torch.Tensor, query_start_loc: torch.Tensor,
    has_initial_state: torch.Tensor | None, num_decodes: int, num_prefills: int, scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """RWKV-7 over a packed batch: r, w, k, a, b [N, H, K], v [N, H, V]; returns o [N, H, V] (v's dtype).

    state [num_slots, H, K, V] (fp32 normally) is read at `state_indices[i]` and written back after each
    request. The first `num_decodes` requests are single-token decode steps (run together as one
    batch); the next `num_prefills` requests are token ranges from `query_start_loc`, each starting from
    its slot when `has_initial_state[j]` (a continued chunked prefill) and from zero otherwise.
    Negative slot ids (padding in a CUDA-graph batch) are sent to slot 0, vLLM's never-used null block.
    """
    N = r.shape[0]
    o = v.new_zeros(v.shape)
    if num_decodes > 0:
        idx = state_indices[:num_decodes].long().clamp(min=0)
        s0 = state[idx].float()
        od, s1 = rwkv7_attention(*(x[:num_decodes, None] for x in (r, w, k, v, a, b)), scale=scale,
                                 initial_state=s0, output_final_state=True, backend=backend)
        o[:num_decodes] = od[:, 0]
        state[idx] = s1.to(state.dtype)
    if num_prefills > 0:
        bounds = query_start_loc[num_decodes:num_decodes + num_prefills + 1].tolist()
        slots = state_indices[num_decodes:num_decodes + num_prefills].tolist()
        init = [True] * num_prefills if has_initial_state is None else has_initial_state.tolist()
        for j in range(num_prefills):
            start, end, slot = bounds[j], min(bounds[j + 1], N), slots[j]
            if end <= start:
                continue
            s0 = state[slot][None].float() if init[j] else None
            op, s1 = rwkv7_attention(*(x[None, start:end] for x in (r, w, k, v, a, b)), scale=scale,
                                     initial_state=s0, output_final_state=True, backend=backend)
            o[start:end] = op[0]
            state[slot] = s1[0].to(state.dtype)
    return o
