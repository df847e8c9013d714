"""Distillation losses. The vocabulary-sized ones never hold B x T x V logits at once."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def alignment_loss(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """Stage 1: per-token L2 distance between mixer and teacher attention outputs, mean, scaled by d^-0.5."""
    d = teacher_out.shape[-1]
    diff = (student_out.float() - teacher_out.float()).norm(dim=-1)
    return diff.mean() * d**-0.5


def _kl_chunk(s_hidden: torch.Tensor, t_logits: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor]
              ) -> torch.Tensor:
    s_logp = F.log_softmax(head(s_hidden).float(), dim=-1)
    t_logp = F.log_softmax(t_logits.float(), dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum()


def chunked_kl(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
               student_head: Callable[[torch.Tensor], torch.Tensor],
               teacher_head: Callable[[torch.Tensor], torch.Tensor], chunk: int = 128,
               recompute: bool = True) -> torch.Tensor:
    """KL(teacher || student) per token (mean, natural log), temperature 1.

    Logits are made chunk by chunk of sequence positions from the final hidden states; the student's
    chunk is recomputed in backward (activation checkpointing), so peak memory is one chunk of B x chunk x V.
    `recompute=False` keeps every chunk's logits for backward instead (B x T x V): FSDP2 on torch < 2.13
    needs it, because there the recomputation of a sharded head runs before FSDP gathers its weight.
    """
    B, T, _ = student_hidden.shape
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, T, chunk):
        sl = slice(start, min(start + chunk, T))
        with torch.no_grad():
            t_logits = teacher_head(teacher_hidden[:, sl])
        if recompute and torch.is_grad_enabled() and student_hidden.requires_grad:
            total = total + checkpoint(_kl_chunk, student_hidden[:, sl], t_logits, student_head, use_reentrant=False)
        else:
            total = total + _kl_chunk(student_hidden[:, sl], t_logits, student_head)
    return total / (B * T)


def chunked_ce(student_hidden: torch.Tensor, input_ids: torch.Tensor,
               student_head: Callable[[torch.Tensor], torch.Tensor], chunk: int = 128,
               recompute: bool = True) -> torch.Tensor:
    """Next-token cross-entropy (stage 4 without a teacher), chunked like `chunked_kl`."""
    B, T, _ = student_hidden.shape
    hidden, targets = student_hidden[:, :-1], input_ids[:, 1:]

    def piece(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(student_head(h).float().flatten(0, 1), y.flatten(), reduction="sum")

    total = student_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, T - 1, chunk):
        sl = slice(start, min(start + chunk, T - 1))
        if recompute and torch.is_grad_enabled() and student_hidden.requires_grad:
            total = total + checkpoint(piece, hidden[:, sl], targets[:, sl], use_reentrant=False)
        else:
            total = total + piece(hidden[:, sl], targets[:, sl])
    return total / (B * (T - 1))
