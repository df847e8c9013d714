"""Loss by position batched and bounded, thin buckets, and the effective context's "not enough data" case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwerky.eval.models import Stream, chunk_len, head_logits, hidden_states, is_recurrent, max_positions, model_device
from qwerky.eval.quality import (
    format_position_table,
    loss_by_position,
    position_buckets,
    position_losses,
    select_documents,
)
from qwerky.eval.teacher_context import (
    describe,
    effective_from_buckets,
    effective_from_position,
    teacher_effective_context,
)


@torch.no_grad()
def _unbatched_position_losses(model, docs, max_len, segment=512, chunk_tokens=None):
    """The pre-batching implementation (one document per forward), kept here as the reference."""
    recurrent = is_recurrent(model)
    cut = max_len if recurrent else min(max_len, max_positions(model) or max_len)
    sums = np.zeros(max_len, dtype=np.float64)
    counts = np.zeros(max_len, dtype=np.int64)
    device = model_device(model)
    for doc in docs:
        ids = torch.as_tensor(list(doc[:cut]), dtype=torch.long, device=device)
        if ids.numel() < 2:
            continue
        step = segment if recurrent else ids.numel()
        stream = Stream(model) if recurrent else None
        for s in range(0, ids.numel() - 1, step):
            piece = ids[s:s + step]
            if stream is not None:
                hidden, head = stream.feed(piece), stream.head
            else:
                hidden, head, _ = hidden_states(model, piece[None])
            n_pred = min(piece.numel(), ids.numel() - 1 - s)
            vocab = head.weight.shape[0] if hasattr(head, "weight") else 1
            c = chunk_tokens or chunk_len(1, vocab)
            for a in range(0, n_pred, c):
                b = min(n_pred, a + c)
                logp = head_logits(model, head, hidden[:, a:b]).log_softmax(-1)[0]
                target = ids[s + a + 1:s + b + 1]
                loss = -logp.gather(-1, target[:, None])[:, 0].double().cpu().numpy()
                sums[s + a + 1:s + b + 1] += loss
                counts[s + a + 1:s + b + 1] += 1
    return sums, counts, cut


def _docs(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 384, int(rng.integers(lo, hi))).tolist() for _ in range(n)]


@pytest.mark.parametrize("which", ["teacher", "student", "baseline"])
def test_batched_position_losses_equal_one_document_at_a_time(tiny_models, which):
    """Right-padded batches of documents sorted by length give the unbatched sums, for the teacher (full
    forward, cut at its max_position_embeddings), the recurrent student and the window baseline (state
    carried across segments of 24 tokens, several segments per document, rows ending in different ones)."""
    teacher, student, baseline = tiny_models
    model = {"teacher": teacher, "student": student, "baseline": baseline}[which]
    docs = _docs(30, 1, 150, seed=3) + [[5], [], [7, 8]]
    old = teacher.config.max_position_embeddings
    teacher.config.max_position_embeddings = 100  # the teacher's cut applies in both paths
    try:
        ref_sums, ref_counts, ref_cut = _unbatched_position_losses(model, docs, 160, segment=24, chunk_tokens=11)
        sums, counts, cut = position_losses(model, docs, 160, segment=24, chunk_tokens=11, batch_tokens=200)
    finally:
        teacher.config.max_position_embeddings = old
    assert cut == ref_cut == (100 if which == "teacher" else 160)
    assert np.array_equal(counts, ref_counts) and counts[1:].sum() > 1000
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-5, atol=1e-4)


def test_bounded_loss_by_position_on_1000_documents(tiny_models):
    """1,000 tiny documents: the budget per bucket is met where the data allows, far fewer documents and
    tokens are read than there are, thin buckets are reported as such, and every model's numbers equal
    the unbatched computation on the documents that were read."""
    teacher, student, baseline = tiny_models
    docs = _docs(985, 2, 120, seed=0) + _docs(12, 130, 260, seed=1) + _docs(3, 300, 400, seed=2)
    max_len, budget = 512, 1500
    buckets = position_buckets(max_len)  # [1,64) [64,128) [128,256) [256,512)
    available = [sum(max(0, min(len(d), hi) - lo) for d in docs) for lo, hi in buckets]
    chosen = select_documents([len(d) for d in docs], max_len, budget)
    assert len(chosen) < 200 and len({i for i, _ in chosen}) == len(chosen)
    models = {"teacher": teacher, "student": student, "baseline": baseline}
    res = loss_by_position(models, docs, max_len, segment=64, tokens_per_bucket=budget, min_tokens=200,
                           min_documents=8, batch_tokens=1024, progress=False)
    assert res["documents"] == len(chosen) and res["documents_available"] == 1000
    row = res["models"]["student"]
    for j in range(len(buckets)):
        assert row["tokens"][j] >= min(budget, available[j])  # met, or everything there is
    # bounded: a document is read only while a bucket it reaches lacks tokens, so each bucket costs at most
    # its budget plus one document's worth of tokens beyond it
    assert row["tokens_read"] <= sum(2 * (budget + hi) for _, hi in buckets)
    assert row["tokens_read"] < sum(len(d) for d in docs) / 10
    assert row["thin"] == [False, False, False, True]  # 3 documents reach 256: too few
    assert row["loss"][3] is None and row["loss_all"][3] is not None and row["documents"][3] == 3
    assert all(v is not None and v > 0 for v in row["loss"][:3]) and all(e > 0 for e in row["stderr"][:3])
    selected = [docs[i][:read] for i, read in chosen]
    for name, model in models.items():
        sums, counts, _ = _unbatched_position_losses(model, selected, max_len, segment=64)
        for j, (lo, hi) in enumerate(buckets):
            assert res["models"][name]["tokens"][j] == counts[lo:hi].sum()
            assert res["models"][name]["loss_all"][j] == pytest.approx(sums[lo:hi].sum() / counts[lo:hi].sum(),
                                                                        rel=1e-6)
    table = format_position_table(res)
    assert f"n/a ({row['tokens'][3]})" in table and "only k tokens or fewer than 8 documents" in table
    assert f"{len(chosen)} of 1000 documents read" in table


def test_select_documents_longest_first_and_unbounded():
    lengths = [10, 300, 70, 5, 200, 1, 130]
    assert select_documents(lengths, 256, None) == [(1, 256), (4, 200), (6, 130), (2, 70), (0, 10), (3, 5)]
    # budget 100: the 300-token document (read to 256) fills [128,256) with 128 tokens, not [1,64) (63) nor
    # [64,128) (64); the 200-token one is read only to 128, the end of the highest bucket still lacking
    # tokens; then the 130-token one reaches only full buckets: selection stops
    assert select_documents(lengths, 256, 100) == [(1, 256), (4, 128)]
    assert select_documents(lengths, 128, 50) == [(1, 128)]


def test_effective_context_not_enough_data():
    buckets = position_buckets(1024, first=128)  # [1,128) [128,256) [256,512) [512,1024)
    rising = [5.0, 4.0, 3.9, 4.6]  # the last bucket looks degraded ...
    full = effective_from_buckets(buckets, rising, tokens=[50_000] * 4, counts=[500] * 4)
    assert full["status"] == "degrades" and full["effective"] == 512
    # ... but it holds 300 tokens of 4 documents: no number, "not enough long text to tell"
    thin = effective_from_buckets(buckets, rising, tokens=[50_000, 20_000, 5_000, 300], counts=[500, 200, 40, 4])
    assert thin["status"] == "not_enough_data" and thin["effective"] is None and not thin["degrades"]
    assert thin["trusted_to"] == 512 and thin["thin_from"] == 512 and thin["thin_tokens"] == 300
    message = describe(thin)
    assert "not enough long text to tell" in message and "512" in message and "about" not in message
    # a rise before the thin buckets is still found
    early = effective_from_buckets(buckets, [5.0, 4.0, 4.5, 9.0], tokens=[50_000, 20_000, 5_000, 300],
                                   counts=[500, 200, 40, 4])
    assert early["status"] == "degrades" and early["effective"] == 256
    # a bucket within twice its standard error of the best is not a rise
    noisy = effective_from_buckets(buckets, [5.0, 4.0, 4.2, 4.1], stderr=[0.01, 0.02, 0.15, 0.1])
    assert noisy["status"] == "holds" and noisy["effective"] == 1024
    assert "does not degrade up to 1024" in describe(noisy)
    unknown = effective_from_buckets(buckets, [5.0, 4.0, None, None])  # no counts given: None is "no text"
    assert unknown["status"] == "not_enough_data" and unknown["trusted_to"] == 256
    assert describe(unknown).endswith("and no text reaches position 256")
    nothing = effective_from_buckets(buckets, [5.0, None, None, None], tokens=[500, 0, 0, 0], counts=[3, 0, 0, 0])
    assert nothing["status"] == "not_enough_data" and "no position bucket holds enough text" in describe(nothing)


def test_effective_context_from_short_documents_and_few_windows(tiny_models):
    """On short documents (the case that once said "about 128 tokens") and on too few windows the
    estimate says it cannot tell."""
    teacher, student, _ = tiny_models
    docs = _docs(200, 5, 60, seed=4) + _docs(5, 130, 200, seed=5)
    res = loss_by_position({"teacher": teacher}, docs, 256, progress=False)
    ctx = effective_from_position(res)
    assert ctx["status"] == "not_enough_data" and ctx["effective"] is None and ctx["thin_from"] == 64
    few = teacher_effective_context(teacher, torch.randint(0, 384, (4, 256)), progress=False)
    assert few["status"] == "not_enough_data" and few["effective"] is None and few["windows"] == 4
    enough = teacher_effective_context(teacher, torch.randint(0, 384, (16, 256)), progress=False)
    assert enough["status"] in ("holds", "degrades") and enough["effective"] is not None


def test_window_baseline_skips_its_zero_gated_branch(tiny_models):
    from qwerky.eval.models import window_baseline

    teacher, _, baseline = tiny_models
    fast = window_baseline(teacher)
    x = torch.randint(0, 384, (2, 150))
    with torch.no_grad():
        torch.testing.assert_close(fast(x).logits, baseline(x).logits, rtol=0, atol=1e-6)
        state_a, state_b = fast.init_state(2), baseline.init_state(2)
        a = [fast(x[:, s:s + 40], past_key_values=state_a, use_cache=True).logits for s in range(0, 150, 40)]
        b = [baseline(x[:, s:s + 40], past_key_values=state_b, use_cache=True).logits for s in range(0, 150, 40)]
    torch.testing.assert_close(torch.cat(a, 1), torch.cat(b, 1), rtol=0, atol=1e-6)
