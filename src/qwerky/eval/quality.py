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

from .models import Stream, chunk_len, head_logits, hidden_states, is_recurrent, max_positions, model_device

__all__ = ["compare_models", "position_losses", "position_buckets", "loss_by_position", "evaluate_quality",
           "build_windows", "tokenize_documents", "format_quality_table", "format_position_table"]


@torch.no_grad()
def compare_models(teacher: nn.Module, student: nn.Module, windows: torch.Tensor, batch_size: int = 8,
                   baseline: nn.Module | None = None, chunk_tokens: int | None = None) -> dict[str, Any]:
    """Teacher/student(/baseline) perplexity; KL(teacher||model) and top-1 agreement for student/baseline.

    windows: LongTensor [N, T]; every window is one parallel forward, and positions 0..T-2 are scored
    against the next token. KL is per token (mean over tokens, nats) in fp32; logits are made from the
    final hidden states `chunk_tokens` positions at a time (default: so one [B, chunk, V] fp32 tensor is
    ~256 MiB), so B x T x V never exists at once.

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
            lt = head_logits(teacher, head_t, ht[:, s:e]).log_softmax(-1)
            nll["teacher"] -= float(lt.gather(-1, target).double().sum())
            pt = lt.exp()
            top_t = lt.argmax(-1)
            for name, (h, head) in hidden.items():
                lm = head_logits(others[name], head, h[:, s:e]).log_softmax(-1).to(t_dev)
                nll[name] -= float(lm.gather(-1, target).double().sum())
                kl[name] += float((pt * (lt - lm)).sum(-1).double().sum())
                agree[name] += int((lm.argmax(-1) == top_t).sum())
                del lm
            count += bsz * (e - s)
            del lt, pt
    result: dict[str, Any] = {"windows": int(n), "seq_len": int(t), "tokens": int(count)}
    t_loss = nll["teacher"] / count
    result["teacher"] = {"loss": t_loss, "ppl": math.exp(t_loss)}
    for name in others:
        loss = nll[name] / count
        result[name] = {"loss": loss, "ppl": math.exp(loss), "kl": kl[name] / count, "top1": agree[name] / count,
                        "ppl_ratio": math.exp(loss - t_loss)}
    return result


@torch.no_grad()
def position_losses(model: nn.Module, docs: Sequence[Sequence[int]], max_len: int, segment: int = 512,
                    chunk_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Summed next-token loss and token count per target position (index 1..L-1), over documents.

    A recurrent model reads each document in one pass, `segment` tokens at a time, carrying its state
    (constant memory), out to `max_len`. Any other model gets one full forward of the document cut at
    min(max_len, its max_position_embeddings); the third return value is that cut.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
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
            n_pred = min(piece.numel(), ids.numel() - 1 - s)  # the document's last token predicts nothing
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


def position_buckets(max_len: int, first: int = 64) -> list[tuple[int, int]]:
    """Log-spaced [lo, hi) buckets of target positions: [1, 64), [64, 128), [128, 256), ..., up to max_len."""
    edges = [1]
    edge = first
    while edge < max_len:
        edges.append(edge)
        edge *= 2
    edges.append(max_len)
    return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


def loss_by_position(models: Mapping[str, nn.Module], docs: Sequence[Sequence[int]], max_len: int,
                     segment: int = 512, chunk_tokens: int | None = None) -> dict[str, Any]:
    """Mean loss per position bucket for every model (None where a bucket has no tokens)."""
    buckets = position_buckets(max_len)
    out: dict[str, Any] = {"buckets": [list(b) for b in buckets], "max_len": max_len, "segment": segment,
                           "documents": len(docs), "models": {}}
    for name, model in models.items():
        sums, counts, cut = position_losses(model, docs, max_len, segment, chunk_tokens)
        losses, tokens = [], []
        for lo, hi in buckets:
            n = int(counts[lo:hi].sum())
            tokens.append(n)
            losses.append(float(sums[lo:hi].sum() / n) if n else None)
        out["models"][name] = {"loss": losses, "tokens": tokens, "cut": cut,
                               "mode": "recurrent, state carried" if is_recurrent(model) else "full forward"}
    return out


def tokenize_documents(paths: Any, tokenizer: Any, max_docs: int | None = None) -> list[list[int]]:
    """Documents from `qwerky.data.read_documents`, tokenised without special tokens."""
    import itertools

    from qwerky.data import read_documents

    docs = list(itertools.islice(read_documents(paths), max_docs))
    return [list(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs]


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
                     segment: int = 512, batch_size: int = 8, baseline: nn.Module | None = None) -> dict[str, Any]:
    """Everything `qwerky eval` reports: the compare_models table and loss by position for all models."""
    docs = tokenize_documents(data, tokenizer, max_docs)
    if not docs:
        raise ValueError(f"no documents found in {data}")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    windows = build_windows(docs, int(eos), seq_len, max_windows)
    quality = compare_models(teacher, model, windows, batch_size=batch_size, baseline=baseline)
    models = {"teacher": teacher, "student": model} | ({"baseline": baseline} if baseline is not None else {})
    position = loss_by_position(models, [d[:position_max] for d in docs], position_max, segment)
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
    names = list(position["models"])
    lines = [f"{'positions':<14}" + "".join(f"{n:>12}" for n in names)]
    for i, (lo, hi) in enumerate(position["buckets"]):
        cells = []
        for n in names:
            v = position["models"][n]["loss"][i]
            cells.append(f"{v:>12.3f}" if v is not None else f"{'-':>12}")
        lines.append(f"{f'{lo}-{hi - 1}':<14}" + "".join(cells))
    cuts = ", ".join(f"{n} cut at {d['cut']}" for n, d in position["models"].items() if d["cut"] < position["max_len"])
    if cuts:
        lines.append(f"({cuts}: full forward limited to max_position_embeddings)")
    return "\n".join(lines)
