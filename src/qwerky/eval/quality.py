"""Distillation quality: perplexity, KL(teacher || model) and top-1 agreement, and loss by token position.

Why these: a perplexity ratio near 1.0 arrives long before the student's distribution matches the
teacher's (method.md), so a conversion is judged by per-token KL and by how often the student's greedy
token equals the teacher's. Loss by position shows what the recurrent state does beyond the training
context, where a RoPE teacher (cut at its maximum) and the 64-token window baseline behave differently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .models import (
    chunk_len,
    head_logits,
    hidden_states,
    is_recurrent,
    max_positions,
    model_device,
    progress_bar,
)

__all__ = ["compare_models", "position_losses", "position_buckets", "loss_by_position", "select_documents",
           "evaluate_quality", "build_windows", "tokenize_documents", "format_quality_table",
           "format_position_table"]

DEFAULT_POSITION_TOKENS = 8192  # loss by position: tokens wanted per position bucket (`--position-tokens`)
MIN_BUCKET_TOKENS = 1000  # fewer tokens than this in a bucket: too thin to report (`n/a (k)`)
MIN_BUCKET_DOCUMENTS = 16  # ... or fewer documents than this
DEFAULT_BATCH_TOKENS = 8192  # tokens per forward when reading documents for loss by position
MAX_ROWS = 256  # documents per forward at most


@torch.no_grad()
def compare_models(teacher: nn.Module, student: nn.Module, windows: torch.Tensor, batch_size: int = 8,
                   baseline: nn.Module | None = None, chunk_tokens: int | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Teacher/student(/baseline) perplexity; KL(teacher||model) and top-1 agreement for student/baseline.

    windows: LongTensor [N, T]; every window is one parallel forward, and positions 0..T-2 are scored
    against the next token. KL is per token (mean over tokens, nats) in fp32; logits are made from the
    final hidden states `chunk_tokens` positions at a time (default: so one [B, chunk, V] fp32 tensor is
    ~128 MiB), so B x T x V never exists at once. Per chunk the teacher's log-probabilities and
    probabilities are made once; each other model's logits become log-probabilities and then their
    difference with the teacher's in place, so at most four [B, chunk, V] tensors are alive.
    `progress` shows a bar (windows done) on stderr.

    Returns {"windows", "seq_len", "tokens", "teacher": {"loss", "ppl"}, "student": {"loss", "ppl", "kl",
    "top1", "ppl_ratio"}, "baseline": {...} (only when given)}.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be a LongTensor [N, T] with T >= 2, got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    others = {"student": student} | ({"baseline": baseline} if baseline is not None else {})
    n, t = windows.shape
    nll = {name: 0.0 for name in ["teacher", *others]}
    kl = {name: 0.0 for name in others}
    agree = {name: 0 for name in others}
    count = 0
    t_dev = model_device(teacher)
    bar = progress_bar(n, f"quality: {' + '.join(['teacher', *others])} on {n} x {t} tokens", "window", progress)
    for b0 in range(0, n, batch_size):
        x = windows[b0:b0 + batch_size].to(t_dev)
        bsz = x.shape[0]
        ht, head_t, _ = hidden_states(teacher, x)
        hidden = {}
        for name, model in others.items():
            h, head, _ = hidden_states(model, x.to(model_device(model)))
            hidden[name] = (h, head)
        vocab = head_t.weight.shape[0] if hasattr(head_t, "weight") else 1
        c = chunk_tokens or chunk_len(bsz, vocab)
        for s in range(0, t - 1, c):
            e = min(t - 1, s + c)
            target = x[:, s + 1:e + 1, None]
            lt = torch.log_softmax(head_logits(teacher, head_t, ht[:, s:e]), dim=-1)
            nll["teacher"] -= float(lt.gather(-1, target).double().sum())
            top_t = lt.argmax(-1)
            pt = lt.exp()
            for name, (h, head) in hidden.items():
                lm = torch.log_softmax(head_logits(others[name], head, h[:, s:e]).to(t_dev), dim=-1)
                nll[name] -= float(lm.gather(-1, target).double().sum())
                agree[name] += int((lm.argmax(-1) == top_t).sum())
                diff = lm.sub_(lt)  # log p_model - log p_teacher, in place
                kl[name] -= float(torch.einsum("btv,btv->bt", pt, diff).double().sum())  # a dot product per row
                del lm, diff
            count += bsz * (e - s)
            del lt, pt
        bar.update(bsz)
    bar.close()
    result: dict[str, Any] = {"windows": int(n), "seq_len": int(t), "tokens": int(count)}
    t_loss = nll["teacher"] / count
    result["teacher"] = {"loss": t_loss, "ppl": math.exp(t_loss)}
    for name in others:
        loss = nll[name] / count
        result[name] = {"loss": loss, "ppl": math.exp(loss), "kl": kl[name] / count, "top1": agree[name] / count,
                        "ppl_ratio": math.exp(loss - t_loss)}
    return result


def position_buckets(max_len: int, first: int = 64) -> list[tuple[int, int]]:
    """Log-spaced [lo, hi) buckets of target positions: [1, 64), [64, 128), [128, 256), ..., up to max_len."""
    edges = [1]
    edge = first
    while edge < max_len:
        edges.append(edge)
        edge *= 2
    edges.append(max_len)
    return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


def _bucket_tokens(read: int, buckets: Sequence[tuple[int, int]]) -> list[int]:
    """Target positions 1..read-1 of a document read to `read` tokens, counted per [lo, hi) bucket."""
    return [max(0, min(read, hi) - lo) for lo, hi in buckets]


def select_documents(lengths: Sequence[int], max_len: int, tokens_per_bucket: int | None,
                     buckets: Sequence[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """Which documents loss by position reads, and how far: [(document index, tokens to read)].

    Longest documents first, so that every bucket is measured on (mostly) the same documents and a
    position's loss is not confused with the kind of document that is long enough to reach it. Each one
    is read up to the end of the highest bucket that still lacks `tokens_per_bucket` tokens among those
    it reaches; once none it reaches lacks any (every shorter document then reaches only full buckets
    too), selection stops. A bucket that the data cannot fill gets every token there is. The cost is
    bounded: about 2 x tokens_per_bucket tokens read per bucket. `tokens_per_bucket=None`: every
    document, cut at max_len (no budget).
    """
    buckets = list(buckets) if buckets is not None else position_buckets(max_len)
    order = sorted(range(len(lengths)), key=lambda i: (-min(lengths[i], max_len), i))
    if tokens_per_bucket is None:
        return [(i, min(lengths[i], max_len)) for i in order if min(lengths[i], max_len) >= 2]
    if tokens_per_bucket < 1:
        raise ValueError(f"tokens_per_bucket must be >= 1, got {tokens_per_bucket}")
    have = [0] * len(buckets)
    chosen: list[tuple[int, int]] = []
    for i in order:
        n = min(lengths[i], max_len)
        if n < 2:
            break
        lacking = [j for j, (lo, _) in enumerate(buckets) if lo < n and have[j] < tokens_per_bucket]
        if not lacking:
            break
        read = min(n, buckets[max(lacking)][1])
        chosen.append((i, read))
        for j, k in enumerate(_bucket_tokens(read, buckets)):
            have[j] += k
    return chosen


def _pad_rows(rows: Sequence[Sequence[int]], width: int, device: torch.device) -> torch.Tensor:
    """Right-padded [R, width] ids: for a causal model, tokens after a row's end change nothing before it."""
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for r, ids in enumerate(rows):
        out[r, :len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
    return out.to(device)


@torch.no_grad()
def _position_pass(model: nn.Module, docs: Sequence[Sequence[int]], max_len: int,
                   buckets: Sequence[tuple[int, int]], segment: int = 512, chunk_tokens: int | None = None,
                   batch_tokens: int = DEFAULT_BATCH_TOKENS, bar: Any = None) -> dict[str, Any]:
    """Per-position loss sums/counts and per-(document, bucket) sums/counts of one model over `docs`.

    Documents are sorted by length and read several per forward, right-padded: every model here is
    causal, so padding after a row's last token cannot change that row's scored positions, and the
    padded positions are not scored. A recurrent model reads each batch `segment` tokens at a time with
    its state carried (padding only ever follows a row's last real token, so it only enters a state that
    is never read again); any other model gets one full forward per batch, cut at
    min(max_len, its max_position_embeddings). Rows per forward: `batch_tokens` // (padded length, or the
    segment for a recurrent model), none shorter than 3/4 of the batch's longest.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
    recurrent = is_recurrent(model)
    cut = max_len if recurrent else min(max_len, max_positions(model) or max_len)
    sums = np.zeros(max_len, dtype=np.float64)
    counts = np.zeros(max_len, dtype=np.int64)
    doc_sums = np.zeros((len(docs), len(buckets)), dtype=np.float64)
    doc_counts = np.zeros((len(docs), len(buckets)), dtype=np.int64)
    device = model_device(model)
    order = sorted((i for i in range(len(docs)) if min(len(docs[i]), cut) >= 2),
                   key=lambda i: (-min(len(docs[i]), cut), i))
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if hasattr(head, "weight") else 1
    b0 = 0
    while b0 < len(order):
        width = min(len(docs[order[b0]]), cut)  # the longest row of this batch
        rows = max(1, min(MAX_ROWS, batch_tokens // (min(width, segment) if recurrent else width)))
        idx = [order[b0]]  # rows of similar length: none shorter than 3/4 of the longest (less padding)
        while len(idx) < rows and b0 + len(idx) < len(order) and \
                4 * min(len(docs[order[b0 + len(idx)]]), cut) >= 3 * width:
            idx.append(order[b0 + len(idx)])
        b0 += len(idx)
        lens = torch.tensor([min(len(docs[i]), cut) for i in idx])
        ids = _pad_rows([docs[i][:cut] for i in idx], width, device)
        step = segment if recurrent else width
        state = model.init_state(len(idx)) if recurrent else None
        for s in range(0, width - 1, step):
            piece = ids[:, s:s + step]
            hidden, head, _ = hidden_states(model, piece, state=state)
            n_pred = min(piece.shape[1], width - 1 - s)  # the last token predicts nothing
            c = chunk_tokens or chunk_len(len(idx), vocab)
            for a in range(0, n_pred, c):
                b = min(n_pred, a + c)
                p0 = s + a + 1  # target positions p0 .. p0 + (b - a) - 1
                logp = torch.log_softmax(head_logits(model, head, hidden[:, a:b]), dim=-1)
                target = ids[:, p0:p0 + (b - a), None]
                loss = -logp.gather(-1, target)[..., 0].double().cpu()
                del logp
                valid = torch.arange(p0, p0 + (b - a))[None, :] < lens[:, None]  # [R, b - a]
                loss = torch.where(valid, loss, 0.0)
                sums[p0:p0 + (b - a)] += loss.sum(0).numpy()
                counts[p0:p0 + (b - a)] += valid.sum(0).numpy()
                for j, (lo, hi) in enumerate(buckets):
                    x0, x1 = max(lo, p0) - p0, min(hi, p0 + (b - a)) - p0
                    if x1 > x0:
                        doc_sums[idx, j] += loss[:, x0:x1].sum(1).numpy()
                        doc_counts[idx, j] += valid[:, x0:x1].sum(1).numpy()
        if bar is not None:
            bar.update(int(lens.sum()))
    return {"sums": sums, "counts": counts, "doc_sums": doc_sums, "doc_counts": doc_counts, "cut": cut}


@torch.no_grad()
def position_losses(model: nn.Module, docs: Sequence[Sequence[int]], max_len: int, segment: int = 512,
                    chunk_tokens: int | None = None, *, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """Summed next-token loss and token count per target position (index 1..L-1), over documents.

    A recurrent model reads each document in one pass, `segment` tokens at a time, carrying its state
    (constant memory), out to `max_len`. Any other model gets one full forward of the document cut at
    min(max_len, its max_position_embeddings); the third return value is that cut. Documents are read
    several per forward (`_position_pass`); the result equals reading them one at a time.
    """
    cut = max_len if is_recurrent(model) else min(max_len, max_positions(model) or max_len)
    total = sum(min(len(d), cut) for d in docs if min(len(d), cut) >= 2)
    with progress_bar(total, "loss by position", "tok", progress) as bar:
        out = _position_pass(model, docs, max_len, position_buckets(max_len), segment, chunk_tokens,
                             batch_tokens, bar)
    return out["sums"], out["counts"], out["cut"]


def loss_by_position(models: Mapping[str, nn.Module], docs: Sequence[Sequence[int]], max_len: int,
                     segment: int = 512, chunk_tokens: int | None = None, *,
                     tokens_per_bucket: int | None = DEFAULT_POSITION_TOKENS, min_tokens: int = MIN_BUCKET_TOKENS,
                     min_documents: int = MIN_BUCKET_DOCUMENTS, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                     progress: bool = True) -> dict[str, Any]:
    """Mean loss per position bucket for every model, on a bounded sample of the documents.

    `select_documents` picks the documents (longest first) until every bucket has `tokens_per_bucket`
    tokens, or every document that can add to one that lacks them has been read (None: all documents).
    A bucket with fewer than `min_tokens` tokens or `min_documents` documents is thin: its `loss` is None
    (`loss_all` keeps the mean of what there was, None when there was nothing) and `thin` marks it.
    Per model: `loss`, `loss_all`, `tokens`, `documents`, `stderr` (over documents, None below 2),
    `thin`, `cut`, `mode`.
    """
    buckets = position_buckets(max_len)
    chosen = select_documents([len(d) for d in docs], max_len, tokens_per_bucket, buckets)
    selected = [list(docs[i][:read]) for i, read in chosen]
    out: dict[str, Any] = {"buckets": [list(b) for b in buckets], "max_len": max_len, "segment": segment,
                           "documents": len(selected), "documents_available": len(docs),
                           "tokens_per_bucket": tokens_per_bucket, "min_tokens": min_tokens,
                           "min_documents": min_documents, "models": {}}
    for name, model in models.items():
        cut = max_len if is_recurrent(model) else min(max_len, max_positions(model) or max_len)
        total = sum(min(len(d), cut) for d in selected)
        with progress_bar(total, f"loss by position: {name} ({len(selected)} documents)", "tok", progress) as bar:
            r = _position_pass(model, selected, max_len, buckets, segment, chunk_tokens, batch_tokens, bar)
        row: dict[str, list[Any]] = {"loss": [], "loss_all": [], "tokens": [], "documents": [], "stderr": [],
                                     "thin": []}
        for j in range(len(buckets)):
            s, c = r["doc_sums"][:, j], r["doc_counts"][:, j]
            n, ndocs = int(c.sum()), int((c > 0).sum())
            mean = float(s.sum() / n) if n else None
            thin = n < min_tokens or ndocs < min_documents
            row["loss"].append(None if thin else mean)
            row["loss_all"].append(mean)
            row["tokens"].append(n)
            row["documents"].append(ndocs)
            row["stderr"].append(_cluster_stderr(s, c, mean) if mean is not None and ndocs > 1 else None)
            row["thin"].append(thin)
        out["models"][name] = row | {"cut": r["cut"], "tokens_read": total,
                                     "mode": "recurrent, state carried" if is_recurrent(model) else "full forward"}
    return out


def _cluster_stderr(sums: np.ndarray, counts: np.ndarray, mean: float) -> float:
    """Standard error of a token-weighted mean loss whose tokens come in documents (the documents are the
    independent units): sqrt(D / (D - 1) * sum_d (s_d - mean n_d)^2) / sum_d n_d."""
    keep = counts > 0
    s, c = sums[keep], counts[keep].astype(np.float64)
    d = len(c)
    return float(np.sqrt(d / (d - 1) * np.sum((s - mean * c) ** 2)) / c.sum())


def tokenize_documents(paths: Any, tokenizer: Any, max_docs: int | None = None,
                       progress: bool = True) -> list[list[int]]:
    """Documents from `qwerky.data.read_documents`, tokenised without special tokens (1,000 at a time)."""
    import itertools

    from qwerky.data import read_documents

    docs = list(itertools.islice(read_documents(paths), max_docs))
    out: list[list[int]] = []
    with progress_bar(len(docs), "tokenising", "doc", progress and len(docs) > 10_000) as bar:
        for i in range(0, len(docs), 1000):
            batch = docs[i:i + 1000]
            out.extend(list(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])
            bar.update(len(batch))
    return out


def build_windows(docs: Sequence[Sequence[int]], eos: int, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """Documents joined with eos (as the training cache does), cut into evenly spread [N, seq_len] windows."""
    from qwerky.data import heldout_windows

    stream: list[int] = []
    for d in docs:
        stream.extend(d)
        stream.append(eos)
    return heldout_windows(np.asarray(stream, dtype=np.uint32), seq_len, max_windows)


def evaluate_quality(model: nn.Module, teacher: nn.Module, tokenizer: Any, data: Any, *, seq_len: int = 512,
                     max_docs: int | None = None, max_windows: int | None = 64, position_max: int = 4096,
                     segment: int = 512, batch_size: int = 8, baseline: nn.Module | None = None,
                     position_tokens: int | None = DEFAULT_POSITION_TOKENS, progress: bool = True) -> dict[str, Any]:
    """Everything `qwerky eval` reports: the compare_models table and loss by position for all models
    (`position_tokens` per position bucket at most, see `loss_by_position`; `position_max < 2` skips it)."""
    docs = tokenize_documents(data, tokenizer, max_docs)
    if not docs:
        raise ValueError(f"no documents found in {data}")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    windows = build_windows(docs, int(eos), seq_len, max_windows)
    quality = compare_models(teacher, model, windows, batch_size=batch_size, baseline=baseline, progress=progress)
    models = {"teacher": teacher, "student": model} | ({"baseline": baseline} if baseline is not None else {})
    position = None
    if position_max >= 2:
        position = loss_by_position(models, [d[:position_max] for d in docs], position_max, segment,
                                    tokens_per_bucket=position_tokens, progress=progress)
    return {"quality": quality, "position": position, "documents": len(docs), "seq_len": seq_len,
            "data": [str(p) for p in (data if isinstance(data, (list, tuple)) else [data])]}


def format_quality_table(quality: Mapping[str, Any]) -> str:
    """A small fixed-width table: model, ppl, KL, top-1 agreement."""
    lines = [f"{'model':<10} {'ppl':>10} {'ppl/teacher':>12} {'KL(t||m)':>10} {'top-1':>8}"]
    for name in ("teacher", "student", "baseline"):
        row = quality.get(name)
        if row is None:
            lines.append(f"{name:<10} {'(skipped)':>10}")
            continue
        kl = f"{row['kl']:.4f}" if "kl" in row else "-"
        top1 = f"{100 * row['top1']:.1f}%" if "top1" in row else "-"
        ratio = f"{row['ppl_ratio']:.3f}" if "ppl_ratio" in row else "1.000"
        lines.append(f"{name:<10} {row['ppl']:>10.3f} {ratio:>12} {kl:>10} {top1:>8}")
    return "\n".join(lines)


def format_position_table(position: Mapping[str, Any]) -> str:
    """Loss per position bucket, one column per model, and the tokens / documents each bucket holds.

    A thin bucket (fewer than `min_tokens` tokens or `min_documents` documents) shows `n/a (k)`, k its
    tokens; a bucket with no token at all (past a teacher's cut, or past the longest document) shows `-`.
    """
    names = list(position["models"])
    rows = position["models"]
    lines = [f"{'positions':<14}" + "".join(f"{n:>12}" for n in names) + f"{'tokens':>10}{'docs':>7}"]
    for i, (lo, hi) in enumerate(position["buckets"]):
        cells = []
        for n in names:
            v, k = rows[n]["loss"][i], rows[n]["tokens"][i] if "tokens" in rows[n] else 0
            if v is not None:
                cells.append(f"{v:>12.3f}")
            else:
                cells.append(f"{f'n/a ({k})' if k else '-':>12}")
        most = max(names, key=lambda n: rows[n].get("tokens", [0] * (i + 1))[i])
        tokens = rows[most].get("tokens", [None] * (i + 1))[i]
        docs = rows[most].get("documents", [None] * (i + 1))[i]
        lines.append(f"{f'{lo}-{hi - 1}':<14}" + "".join(cells) + f"{'' if tokens is None else tokens:>10}"
                     f"{'' if docs is None else docs:>7}")
    cuts = ", ".join(f"{n} cut at {d['cut']}" for n, d in rows.items() if d["cut"] < position["max_len"])
    if cuts:
        lines.append(f"({cuts}: full forward limited to max_position_embeddings)")
    if any(any(d.get("thin", [])) for d in rows.values()):
        lines.append(f"(n/a (k): only k tokens or fewer than {position.get('min_documents', MIN_BUCKET_DOCUMENTS)} "
                     f"documents reach those positions; a bucket needs {position.get('min_tokens', MIN_BUCKET_TOKENS)}"
                     " tokens to be reported)")
    budget = position.get("tokens_per_bucket")
    if budget:
        lines.append(f"({position['documents']} of {position.get('documents_available', position['documents'])} "
                     f"documents read, longest first, until each bucket had {budget} tokens or none was left)")
    return "\n".join(lines)
