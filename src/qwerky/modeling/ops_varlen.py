"""Variable-length batches for the chunked forms (`chunk_rwkv7_torch`, `chunk_rwkv6_torch`,
`chunk_gated_delta_rule_torch`): several sequences packed into one [1, T, ...] stream with `cu_seqlens`
(token offsets [S + 1], fla's convention), run as one pass instead of one call per sequence.

Each sequence is laid out from a chunk boundary and padded to whole chunks with zero steps (the identity
step of every one of these recurrences, as the chunked forms already pad), so every chunk holds the
tokens it would hold if the sequence ran alone: the intra-chunk math of all sequences is one batched
matmul, and only the chunk-to-chunk scan knows where sequences start and end (vectorised over sequences:
as many steps as the longest sequence has chunks). Used by vLLM's packed prefill (qwerky.vllm.ops).

This file is copied into every exported model folder: it must import nothing from qwerky.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["ChunkLayout", "chunk_layout", "to_chunk_stream", "from_chunk_stream", "segment_scan", "matrix_update"]


@dataclass(frozen=True)
class ChunkLayout:
    """Where the tokens of a packed varlen batch sit in a chunk-aligned stream of `num_chunks` chunks."""

    index: torch.Tensor  # [T] long: position of each packed token in the chunk-aligned stream
    cu_chunks: tuple[int, ...]  # [S + 1] chunk offsets per sequence
    chunk_size: int

    @property
    def num_chunks(self) -> int:
        return self.cu_chunks[-1]

    @property
    def num_seqs(self) -> int:
        return len(self.cu_chunks) - 1


def chunk_layout(cu_seqlens: torch.Tensor, chunk_size: int, total: int) -> ChunkLayout:
    """The layout of sequences with token offsets `cu_seqlens` ([S + 1], starting at 0, ending at `total`)."""
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != total or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the {total} packed tokens, got {bounds}")
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    chunks = [-(-n // chunk_size) for n in lengths]
    cu_chunks = [0]
    for c in chunks:
        cu_chunks.append(cu_chunks[-1] + c)
    device = cu_seqlens.device
    seq_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                           torch.tensor(lengths, device=device))
    shift = torch.tensor([c * chunk_size - s for c, s in zip(cu_chunks, bounds)], device=device)
    index = torch.arange(total, device=device) + shift[seq_of_token] if total else seq_of_token
    return ChunkLayout(index.long(), tuple(cu_chunks), chunk_size)


def to_chunk_stream(x: torch.Tensor, layout: ChunkLayout, dim: int) -> torch.Tensor:
    """x with the packed tokens along `dim` -> the chunk-aligned stream (zero steps between sequences)."""
    shape = list(x.shape)
    shape[dim] = layout.num_chunks * layout.chunk_size
    return x.new_zeros(shape).index_copy_(dim, layout.index, x)


def from_chunk_stream(x: torch.Tensor, layout: ChunkLayout, dim: int) -> torch.Tensor:
    """The inverse of `to_chunk_stream` for outputs: the packed tokens' rows, padding dropped."""
    return x.index_select(dim, layout.index)


def segment_scan(
    update: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    transition: torch.Tensor, increment: torch.Tensor, initial_state: torch.Tensor, layout: ChunkLayout,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk-to-chunk scan S <- update(transition_n, increment_n, S) of each sequence from its own
    initial state, all sequences at once. transition [H, N, ...] and increment [H, N, K, V] per chunk of the
    stream (N = layout.num_chunks), initial_state [S, H, K, V]. Returns the state entering each chunk
    [H, N, K, V] and each sequence's final state [S, H, K, V] (its initial state when it has no tokens).

    As in a packed RNN batch: sequences sorted longest first, so the ones still running at step j are a
    prefix of the state, and the chunks are gathered once into step order (j-th chunk of every running
    sequence side by side), so each step reads and writes contiguous slices."""
    cu = layout.cu_chunks
    counts = [b - a for a, b in zip(cu, cu[1:])]
    order = sorted(range(len(counts)), key=lambda i: -counts[i])
    steps = max(counts, default=0)
    running = [sum(1 for i in order if counts[i] > j) for j in range(steps)]
    perm_list = [cu[i] + j for j in range(steps) for i in order[:running[j]]]
    device = increment.device
    identity = perm_list == list(range(increment.shape[1]))  # one sequence: chunks already in step order
    perm = torch.tensor(perm_list, device=device, dtype=torch.long)
    trans, inc = (transition, increment) if identity else (transition.index_select(1, perm),
                                                          increment.index_select(1, perm))
    state = initial_state.float().transpose(0, 1)[:, order].contiguous()  # [H, S, K, V], longest first
    starts_p = inc.new_empty(inc.shape)
    offset = 0
    for live in running:
        s = state[:, :live]
        starts_p[:, offset:offset + live] = s
        state[:, :live] = update(trans[:, offset:offset + live], inc[:, offset:offset + live], s)
        offset += live
    starts = starts_p if identity else increment.new_zeros(increment.shape).index_copy_(1, perm, starts_p)
    finals = torch.empty_like(state).index_copy_(1, torch.tensor(order, device=device, dtype=torch.long), state)
    return starts, finals.transpose(0, 1)


def matrix_update(transition: torch.Tensor, increment: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """S <- T S + E for [H, A, K, K] / [H, A, K, V] blocks (RWKV-7, gated delta rule), with the same
    batched matmul as the chunked forms' own scan."""
    return torch.baddbmm(increment.flatten(0, 1), transition.flatten(0, 1), state.flatten(0, 1)).view(state.shape)


def matrix_chunks_output(Q: torch.Tensor, R: torch.Tensor, Tn: torch.Tensor, En: torch.Tensor,
                         initial_state: torch.Tensor | None, layout: ChunkLayout, heads: int, scale: float,
                         dtype: torch.dtype, output_final_state: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The varlen ending of the chunked forms whose chunk transition is a matrix (RWKV-7, gated delta rule): each
    sequence's chunks scanned from its own initial state (S_end = T_n S_start + E_n), every chunk's output
    scale * (Q S_start + R), and the packed tokens' rows. Q [M, C, K], R [M, C, V], Tn [M, K, K], En [M, K, V]
    with M = heads x chunks of the stream; returns (o [1, T, H, V], final states [S, H, K, V] or None)."""
    M, C, K = Q.shape
    V, N = En.shape[-1], M // heads
    s0 = Q.new_zeros(layout.num_seqs, heads, K, V) if initial_state is None else initial_state
    starts, finals = segment_scan(matrix_update, Tn.view(heads, N, K, K), En.view(heads, N, K, V), s0, layout)
    o = torch.baddbmm(R, Q, starts.reshape(M, K, V), beta=scale, alpha=scale)
    o = from_chunk_stream(o.view(1, heads, N * C, V), layout, dim=2).transpose(1, 2).to(dtype)
    return o, (finals if output_final_state else None)

