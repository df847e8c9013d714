"""Teacher vs student lm-eval results as a ratio table (task, metric, teacher, student, ratio).

Why ratios: the method is judged by how much of the teacher's score the student keeps (MMLU retention
92-95% in the published conversions), which a ratio column shows directly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "ppl")


def load_results(path: str | Path) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from an lm-eval results JSON (stderr entries and aliases dropped)."""
    data = json.loads(Path(path).read_text())
    if "results" not in data:
        raise ValueError(f"{path} has no 'results': is it an lm-eval results_*.json file?")
    out: dict[str, dict[str, float]] = {}
    for task, metrics in data["results"].items():
        for key, value in metrics.items():
            if "stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            out.setdefault(task, {})[key.split(",")[0]] = float(value)
    return out


def compare_results(teacher: dict[str, dict[str, float]], student: dict[str, dict[str, float]],
                    metrics: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per (task, metric) present in both, ratio = student / teacher."""
    rows = []
    for task in sorted(set(teacher) & set(student)):
        for metric in sorted(set(teacher[task]) & set(student[task])):
            if metrics and metric not in metrics:
                continue
            t, s = teacher[task][metric], student[task][metric]
            rows.append({"task": task, "metric": metric, "teacher": t, "student": s,
                         "ratio": s / t if t else None,
                         "lower_is_better": any(k in metric for k in LOWER_IS_BETTER)})
    return rows


def _fmt(value: float, metric: str) -> str:
    if any(k in metric for k in LOWER_IS_BETTER):
        return f"{value:.3f}"
    return f"{100 * value:.1f}" if abs(value) <= 1.0 else f"{value:.2f}"


def format_markdown(rows: Sequence[dict[str, Any]], teacher_name: str = "teacher",
                    student_name: str = "student") -> str:
    """Markdown table; accuracies in percent; the last row averages the ratios of higher-is-better metrics."""
    lines = [f"| task | metric | {teacher_name} | {student_name} | ratio |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        note = " (lower is better)" if r["lower_is_better"] else ""
        lines.append(f"| {r['task']} | {r['metric']}{note} | {_fmt(r['teacher'], r['metric'])} | "
                     f"{_fmt(r['student'], r['metric'])} | {ratio} |")
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None and not r["lower_is_better"]]
    if ratios:
        lines.append(f"| **mean** | higher-is-better metrics | | | {sum(ratios) / len(ratios):.3f} |")
    return "\n".join(lines)
