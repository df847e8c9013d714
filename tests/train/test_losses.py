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


def test_focus_weights() -> None:
    from qwerky.train.losses import focus_weights

    kl = torch.tensor([0.1, 0.1, 0.1, 0.1, 2.0, 0.0])
    w = focus_weights(kl, 1.0)
    assert torch.allclose(w.mean(), torch.tensor(1.0)) and w.argmax() == 4 and w[5] == 0
    assert torch.allclose(focus_weights(kl, 0.0), torch.ones(6))  # focus 0: the plain mean
    capped = focus_weights(torch.tensor([1.0] * 99 + [1000.0]), 1.0, cap=20.0)
    assert capped.max() / capped.min() < 0.5 * 1000  # uncapped, the ratio would be 1000


def test_kl_focus_weights_the_hard_positions() -> None:
    """With focus, more of the gradient goes to the position the student gets most wrong; focus 0 is the
    plain KL."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 20, bias=False)
    ht = torch.randn(1, 10, 8)
    hs = ht.clone()
    hs[0, 3] += 3.0  # one position far off
    hs.requires_grad_(True)
    plain = chunked_kl(hs, ht, head, head, chunk=4)
    focused = chunked_kl(hs, ht, head, head, chunk=16, focus=1.0)
    assert torch.allclose(chunked_kl(hs, ht, head, head, chunk=4, focus=0.0), plain)
    assert focused > plain  # the far-off position weighs more than 1/10
    g_plain = torch.autograd.grad(plain, hs)[0].norm(dim=-1)[0]
    g_focus = torch.autograd.grad(focused, hs)[0].norm(dim=-1)[0]
    assert g_focus[3] / g_focus.sum() > g_plain[3] / g_plain.sum()
