"""PNG plots (matplotlib, Agg backend: no display needed on a training node)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"teacher": "tab:blue", "student": "tab:red", "baseline": "tab:green"}


def plot_loss_by_position(position: Mapping[str, Any], out: str | Path, train_len: int | None = None) -> Path:
    """Loss against token position (bucket centres, log x), one line per model; marks cuts and train length."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    buckets = position["buckets"]
    centres = [((lo * max(hi - 1, lo)) ** 0.5) for lo, hi in buckets]
    for name, data in position["models"].items():
        pts = [(x, y) for x, y in zip(centres, data["loss"]) if y is not None]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=f"{name} ({data['mode']})", color=COLORS.get(name))
        if data.get("cut") and data["cut"] < position["max_len"]:
            ax.axvline(data["cut"], color=COLORS.get(name, "gray"), ls=":", lw=1)
    if train_len:
        ax.axvline(train_len, color="gray", ls="--", lw=1, label=f"training length {train_len}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token position")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title("Loss by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out, dpi=110)


def _save(fig: Any, out: str | Path, dpi: int) -> Path:
    """Lay out, write the PNG (creating its folder) and free the figure."""
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def plot_heatmap(acc: Sequence[Sequence[float | None]], depths: Sequence[float | None], lengths: Sequence[int],
                 title: str, out: str | Path) -> Path:
    """Accuracy heatmap: rows are needle depths, columns prompt lengths, 0-100 colour scale."""
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in acc], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.35 * len(depths)))
    im = ax.imshow(data, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
    ax.set_yticks(range(len(depths)), ["-" if d is None else f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.0f}", ha="center", va="center", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, out, dpi=110)


def plot_training_curves(records: Sequence[Mapping[str, Any]], out: str | Path) -> Path:
    """Loss against tokens, one panel per stage (from log.jsonl lines)."""
    stages: dict[Any, list[Mapping[str, Any]]] = {}
    for r in records:
        if "loss" in r:
            stages.setdefault(r.get("stage", "?"), []).append(r)
    n = max(1, len(stages))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for ax, (stage, rows) in zip(axes[0], sorted(stages.items(), key=lambda kv: str(kv[0]))):
        xkey = "tokens" if all("tokens" in r for r in rows) else "step"
        ax.plot([r.get(xkey, i) for i, r in enumerate(rows)], [r["loss"] for r in rows], color="tab:red")
        ax.set_title(f"stage {stage}")
        ax.set_xlabel(xkey)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    return _save(fig, out, dpi=100)
