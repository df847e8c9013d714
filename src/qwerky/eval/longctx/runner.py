"""Run a long-context task on several models (teacher, student, window baseline) over the same prompts."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..models import eos_ids, greedy_generate_many, is_recurrent
from . import USES_DEPTH, make_samples
from .common import Sample
from .scoring import RULER_THRESHOLD, effective_length, score

log = logging.getLogger(__name__)

MODEL_ORDER = ("teacher", "student", "baseline")


def run_model(model: nn.Module, tokenizer: Any, samples: Sequence[Sample], max_new_tokens: int | None = None,
              batch_size: int = 8, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Greedy answers and scores for every sample (recurrent state or KV cache; prompts of one length batched)."""
    records: list[dict[str, Any]] = []
    eos = eos_ids(model, tokenizer)
    by_length: dict[int, list[Sample]] = {}
    for s in samples:
        by_length.setdefault(s.length, []).append(s)
    for length, group in by_length.items():
        budget = max(s.max_new_tokens for s in group)
        if max_new_tokens is not None:
            budget = min(budget, max_new_tokens)
        prompts = [tokenizer(s.prompt, add_special_tokens=False)["input_ids"] for s in group]
        outs = greedy_generate_many(model, prompts, budget, eos_token_ids=eos, batch_size=batch_size)
        for s, ids in zip(group, outs):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            records.append({"length": s.length, "depth": s.depth, "n_tokens": s.n_tokens, "answers": s.answers,
                            "prediction": text, "score": score(s.metric, text, s.answers)})
        if progress:
            mean = 100 * sum(r["score"] for r in records[-len(group):]) / len(group)
            progress(f"  length {length}: {mean:.1f}")
    return records


def summarise(records: Sequence[Mapping[str, Any]], lengths: Sequence[int],
              depths: Sequence[float | None]) -> dict[str, Any]:
    """Accuracy (percent) per depth x length, per length, and the effective length."""
    acc: list[list[float | None]] = []
    for d in depths:
        row: list[float | None] = []
        for length in lengths:
            vals = [r["score"] for r in records if r["length"] == length and r["depth"] == d]
            row.append(100 * sum(vals) / len(vals) if vals else None)
        acc.append(row)
    by_length: list[float | None] = []
    for length in lengths:
        vals = [r["score"] for r in records if r["length"] == length]
        by_length.append(100 * sum(vals) / len(vals) if vals else None)
    return {"acc": acc, "by_length": by_length, "effective_length": effective_length(lengths, by_length)}


def run_longctx(models: Mapping[str, nn.Module | None], tokenizer: Any, task: str, lengths: Sequence[int],
                depths: Sequence[float], samples: int, seed: int = 0, max_new_tokens: int | None = None,
                batch_size: int = 8, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every model answers the same seeded prompts; a None model is reported as not run."""
    lengths = sorted(int(x) for x in lengths)
    use_depths: list[float | None] = list(depths) if task in USES_DEPTH else [None]
    items = make_samples(task, tokenizer, lengths, list(depths), samples, seed)
    result: dict[str, Any] = {
        "task": task, "lengths": lengths, "depths": use_depths, "samples": samples, "seed": seed,
        "threshold": RULER_THRESHOLD, "max_new_tokens": max_new_tokens,
        "prompt_tokens": {str(L): [s.n_tokens for s in items if s.length == L] for L in lengths},
        "models": {},
    }
    for name, model in models.items():
        if model is None:
            result["models"][name] = {"skipped": True}
            continue
        if progress:
            progress(f"{task}: {name} ({'recurrent state' if is_recurrent(model) else 'KV cache'})")
        records = run_model(model, tokenizer, items, max_new_tokens, batch_size, progress)
        result["models"][name] = summarise(records, lengths, use_depths) | {"records": records}
    return result


def format_table(result: Mapping[str, Any]) -> str:
    """Accuracy by length, one column per model (teacher, student, baseline), then effective lengths."""
    names = [n for n in MODEL_ORDER if n in result["models"]] + [
        n for n in result["models"] if n not in MODEL_ORDER]
    lines = [f"{result['task']} (accuracy %, mean over depths; threshold {result['threshold']})",
             f"{'length':>8}" + "".join(f"{n:>10}" for n in names)]
    for i, length in enumerate(result["lengths"]):
        cells = []
        for n in names:
            m = result["models"][n]
            v = None if m.get("skipped") else m["by_length"][i]
            cells.append(f"{'n/a' if v is None else f'{v:.1f}':>10}")
        lines.append(f"{length:>8}" + "".join(cells))
    eff = []
    for n in names:
        m = result["models"][n]
        v = "n/a" if m.get("skipped") else (m["effective_length"] if m["effective_length"] is not None else "<min")
        eff.append(f"{str(v):>10}")
    lines.append(f"{'eff.len':>8}" + "".join(eff))
    return "\n".join(lines)


def plot_heatmaps(result: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    from ..plots import plot_heatmap

    paths = []
    for name, m in result["models"].items():
        if m.get("skipped"):
            continue
        title = f"{result['task']} - {name} (effective length {m['effective_length']})"
        paths.append(plot_heatmap(m["acc"], result["depths"], result["lengths"], title,
                                  Path(out_dir) / f"{result['task']}_{name}.png"))
    return paths
