from __future__ import annotations

import math

import torch

from qwerky.eval.quality import compare_models, loss_by_position, position_buckets, position_losses


def _reference(teacher, model, x):
    """Straightforward full-logit KL / agreement / nll, to check the chunked implementation."""
    with torch.no_grad():
        lt = teacher(x).logits[:, :-1].float().log_softmax(-1)
        lm = model(x).logits[:, :-1].float().log_softmax(-1)
    tgt = x[:, 1:, None]
    kl = (lt.exp() * (lt - lm)).sum(-1).mean().item()
    agree = (lt.argmax(-1) == lm.argmax(-1)).float().mean().item()
    return -lt.gather(-1, tgt).mean().item(), -lm.gather(-1, tgt).mean().item(), kl, agree


def test_compare_models_matches_full_logits(tiny_models):
    teacher, student, baseline = tiny_models
    torch.manual_seed(0)
    x = torch.randint(0, 384, (3, 40))
    res = compare_models(teacher, student, x, batch_size=2, baseline=baseline, chunk_tokens=7)
    t_nll, s_nll, kl, agree = _reference(teacher, student, x)
    assert res["tokens"] == 3 * 39
    assert math.isclose(res["teacher"]["loss"], t_nll, rel_tol=1e-5)
    assert math.isclose(res["student"]["loss"], s_nll, rel_tol=1e-5)
    assert math.isclose(res["student"]["kl"], kl, rel_tol=1e-4, abs_tol=1e-6)
    assert math.isclose(res["student"]["top1"], agree, abs_tol=1e-6)
    assert math.isclose(res["teacher"]["ppl"], math.exp(t_nll), rel_tol=1e-5)
    # the window baseline equals the teacher inside its 64-token window (zero-gated recurrent branch)
    assert res["baseline"]["kl"] < 1e-4 and res["baseline"]["top1"] > 0.99


def test_compare_models_self_is_zero(tiny_models):
    teacher, _, _ = tiny_models
    res = compare_models(teacher, teacher, torch.randint(0, 384, (2, 16)))
    assert abs(res["student"]["kl"]) < 1e-6 and res["student"]["top1"] == 1.0 and "baseline" not in res


def test_position_losses_carry_state_like_one_forward(tiny_models):
    teacher, student, _ = tiny_models
    torch.manual_seed(1)
    doc = torch.randint(0, 384, (150,)).tolist()
    sums, counts, cut = position_losses(student, [doc, doc[:20]], max_len=200, segment=32, chunk_tokens=10)
    assert cut == 200 and counts[1:150].min() >= 1 and counts[0] == 0 and counts[150:].sum() == 0
    with torch.no_grad():
        logp = student(torch.tensor([doc])).logits[0, :-1].float().log_softmax(-1)
    ref = -logp.gather(-1, torch.tensor(doc[1:])[:, None])[:, 0]
    got = sums[1:150].copy()
    got[:19] -= ref[:19].numpy()  # the short document repeats the first 19 predictions
    assert torch.allclose(torch.from_numpy(got).float(), ref, atol=1e-4)
    # a non-recurrent model is cut at its max_position_embeddings
    teacher.config.max_position_embeddings, old = 100, teacher.config.max_position_embeddings
    try:
        _, counts_t, cut_t = position_losses(teacher, [doc], max_len=200)
    finally:
        teacher.config.max_position_embeddings = old
    assert cut_t == 100 and counts_t[100:].sum() == 0 and counts_t[1:100].min() == 1


def test_buckets_and_loss_by_position(tiny_models):
    teacher, student, _ = tiny_models
    assert position_buckets(300) == [(1, 64), (64, 128), (128, 256), (256, 300)]
    doc = list(range(1, 101))
    res = loss_by_position({"teacher": teacher, "student": student}, [doc], 130, segment=64)
    assert res["models"]["student"]["tokens"] == [63, 36, 0]
    assert res["models"]["student"]["loss"][2] is None
