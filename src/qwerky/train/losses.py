"""Distillation losses. The vocabulary-sized ones never hold B x T x V logits at once."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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


class _LossWithGradInForward(torch.autograd.Function):
    """Sum of `chunk_loss(hidden[:, sl], sl)` over the chunks, its gradients computed chunk by chunk in the
    forward pass itself and kept (hidden-sized, plus one copy of each head parameter) for backward."""

    @staticmethod
    def forward(ctx: Any, chunk_loss: Callable[[torch.Tensor, slice], torch.Tensor], chunks: list[slice],
                hidden: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        grad_hidden = torch.zeros_like(hidden)
        grad_params = [torch.zeros_like(p) for p in params]
        total = hidden.new_zeros((), dtype=torch.float32)
        for sl in chunks:
            h = hidden[:, sl].detach().requires_grad_(True)
            with torch.enable_grad():
                loss = chunk_loss(h, sl)
                grads = torch.autograd.grad(loss, [h, *params])
            grad_hidden[:, sl] = grads[0]
            for acc, g in zip(grad_params, grads[1:]):
                acc += g
            total += loss.detach().float()
        ctx.save_for_backward(grad_hidden, *grad_params)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, *grad_params = ctx.saved_tensors
        return (None, None, grad_hidden * grad_out.to(grad_hidden.dtype),
                *(g * grad_out.to(g.dtype) for g in grad_params))


def chunked_kl(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
               student_head: Callable[[torch.Tensor], torch.Tensor],
               teacher_head: Callable[[torch.Tensor], torch.Tensor], chunk: int = 128,
               recompute: bool = True, head_params: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """KL(teacher || student) per token (mean, natural log), temperature 1.

    Logits are made chunk by chunk of sequence positions from the final hidden states, so peak memory is
    one chunk of B x chunk x V. Three ways to get the gradient:

    * `head_params` given (the student head's parameters that train, possibly none): each chunk's gradient
      (to the hidden states and those parameters) is computed in the forward pass, right after its loss;
      backward only hands it on. Nothing vocabulary-sized outlives its chunk and the head runs once.
      Not under FSDP2 (the head's unit must see its gradients in backward).
    * `recompute=True`: the student's chunk is recomputed in backward (activation checkpointing); each
      chunk's teacher logits are kept for it (B x T x V in all).
    * `recompute=False` keeps every chunk's logits for backward instead (B x T x V): FSDP2 on torch < 2.13
      needs it, because there the recomputation of a sharded head runs before FSDP gathers its weight.
    """
    B, T, _ = student_hidden.shape
    chunks = [slice(start, min(start + chunk, T)) for start in range(0, T, chunk)]
    grad = torch.is_grad_enabled() and student_hidden.requires_grad
    if head_params is not None and grad:
        def chunk_loss(h: torch.Tensor, sl: slice) -> torch.Tensor:
            with torch.no_grad():
                t_logits = teacher_head(teacher_hidden[:, sl])
            return _kl_chunk(h, t_logits, student_head)
        return _LossWithGradInForward.apply(chunk_loss, chunks, student_hidden, *head_params) / (B * T)
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for sl in chunks:
        with torch.no_grad():
            t_logits = teacher_head(teacher_hidden[:, sl])
        if recompute and grad:
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
