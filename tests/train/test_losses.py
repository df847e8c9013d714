"""Chunked KL / CE equal their unchunked definitions, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwerky.train.losses import alignment_loss, chunked_ce, chunked_kl


@pytest.mark.parametrize("recompute", [True, False])
def test_chunked_kl_matches_full(recompute: bool) -> None:
    torch.manual_seed(0)
    head_s, head_t = torch.nn.Linear(16, 50, bias=False), torch.nn.Linear(16, 50, bias=False)
    hs = torch.randn(3, 37, 16, requires_grad=True)
    ht = torch.randn(3, 37, 16)
    loss = chunked_kl(hs, ht, head_s, head_t, chunk=8, recompute=recompute)
    loss.backward()
    g = hs.grad.clone()
    hs.grad = None
    t_logp = F.log_softmax(head_t(ht), -1)
    ref = F.kl_div(F.log_softmax(head_s(hs), -1), t_logp, log_target=True, reduction="sum") / (3 * 37)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-5)
    assert torch.allclose(g, hs.grad, rtol=1e-4, atol=1e-7)
    assert chunked_kl(ht, ht, head_t, head_t, chunk=5).abs() < 1e-6


def test_chunked_ce_matches_full() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    h = torch.randn(2, 21, 16)
    ids = torch.randint(0, 50, (2, 21))
    ref = F.cross_entropy(head(h[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    assert torch.allclose(chunked_ce(h, ids, head, chunk=4), ref, rtol=1e-5)
    assert torch.allclose(chunked_ce(h, ids, head, chunk=4, recompute=False), ref, rtol=1e-5)


def test_alignment_loss_scaling() -> None:
    a, b = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    assert torch.isclose(alignment_loss(a, b), torch.tensor(2.0 * 4**-0.5))  # |1|_2 over 4 dims = 2


@pytest.mark.parametrize("train_head", [False, True])
def test_chunked_kl_gradient_in_forward(train_head: bool) -> None:
    """`head_params`: the gradient computed chunk by chunk in the forward pass equals plain autograd's, for the
    hidden states and (when the head trains) the head's weight, tied or not."""
    torch.manual_seed(0)
    head_s, head_t = torch.nn.Linear(16, 50, bias=False), torch.nn.Linear(16, 50, bias=False)
    head_s.requires_grad_(train_head)
    hs = torch.randn(3, 37, 16, requires_grad=True)
    ht = torch.randn(3, 37, 16)
    params = [p for p in head_s.parameters() if p.requires_grad]
    loss = chunked_kl(hs * 1.5, ht, head_s, head_t, chunk=8, head_params=params)
    loss.backward()
    got = [hs.grad.clone()] + [p.grad.clone() for p in params]
    hs.grad = None
    for p in params:
        p.grad = None
    ref = chunked_kl(hs * 1.5, ht, head_s, head_t, chunk=37, recompute=False)
    ref.backward()
    want = [hs.grad] + [p.grad for p in params]
    assert torch.allclose(loss, ref, rtol=1e-5)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-7)
