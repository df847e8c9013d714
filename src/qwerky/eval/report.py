"""A conversion's reports: report.md (written beside the student by `qwerky convert`) and `qwerky report
RUN_DIR`, one self-contained HTML page for a run (images embedded as base64).

The HTML page reads what a run leaves behind: log.jsonl (training loss per stage), report.json (quality table
and stages) and longctx/ (results of `qwerky longctx` and their heatmaps). Anything missing or unreadable is
named on the page instead of failing, so a report can be made of a half-finished run.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_report", "read_log", "render_report_md"]


def read_log(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records of log.jsonl and the number of lines that were not JSON objects."""
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    return records, bad


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _fig_png(fn: Any, *args: Any) -> bytes:
    """Render a plot function (which writes a file) into bytes via a temporary file."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plot.png"
        fn(*args, out)
        return out.read_bytes()


def _missing(text: str) -> str:
    return f'<p class="missing">{html.escape(text)}</p>'


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return html.escape(json.dumps(v)[:200])
    return html.escape(str(v))


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return _missing("(empty)")
    cols = list(columns or dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _training_section(run: Path) -> str:
    path = run / "log.jsonl"
    if not path.is_file():
        return _missing(f"missing: {path.name} (no training log in this run directory)")
    records, bad = read_log(path)
    out = []
    if bad:
        out.append(_missing(f"{bad} line(s) of {path.name} were not JSON objects and were skipped"))
    losses = [r for r in records if isinstance(r.get("loss"), (int, float))]
    if not losses:
        return "".join(out) + _missing(f"{path.name} has no records with a loss")
    from .plots import plot_training_curves

    out.append(_img(_fig_png(plot_training_curves, losses), "training loss per stage"))
    summary = []
    for stage in sorted({str(r.get("stage", "?")) for r in losses}):
        rows = [r for r in losses if str(r.get("stage", "?")) == stage]
        summary.append({"stage": stage, "records": len(rows), "first loss": rows[0]["loss"],
                        "last loss": rows[-1]["loss"], "tokens": rows[-1].get("tokens", ""),
                        "time (s)": rows[-1].get("time", "")})
    out.append(_table(summary))
    return "".join(out)


def _quality_section(run: Path) -> str:
    path = run / "report.json"
    if not path.is_file():
        return _missing("missing: report.json (the conversion has not written its quality report)")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return _missing(f"report.json is not valid JSON: {e}")
    out = []
    quality = report.get("quality")
    if isinstance(quality, Mapping):
        rows = []
        for name in ("teacher", "student", "baseline"):
            q = quality.get(name)
            if not isinstance(q, Mapping):
                rows.append({"model": name, "ppl": "missing"})
                continue
            rows.append({"model": name, "ppl": q.get("ppl", ""), "ppl / teacher": q.get("ppl_ratio", ""),
                         "KL(teacher||model)": q.get("kl", ""),
                         "top-1 agreement": f"{100 * q['top1']:.1f}%" if "top1" in q else ""})
        out.append(_table(rows))
        extra = {k: v for k, v in quality.items() if k not in ("teacher", "student", "baseline")}
        if extra:
            out.append(f"<p>{_fmt(extra)}</p>")
    else:
        out.append(_missing("report.json has no 'quality' section"))
    position = report.get("position")
    if isinstance(position, Mapping) and "models" in position:
        from .plots import plot_loss_by_position

        out.append(_img(_fig_png(plot_loss_by_position, position), "loss by position"))
    stages = report.get("stages")
    out.append("<h3>Stages</h3>")
    if isinstance(stages, list) and stages:
        out.append(_table([s if isinstance(s, Mapping) else {"stage": s} for s in stages]))
    else:
        out.append(_missing("report.json has no 'stages' list"))
    return "".join(out)


def _longctx_section(run: Path) -> str:
    folder = run / "longctx"
    if not folder.is_dir():
        return _missing("missing: longctx/ (no long-context results; run `qwerky longctx ... --json RUN_DIR/longctx/"
                        "TASK.json --plot-dir RUN_DIR/longctx`)")
    out = []
    jsons = sorted(folder.glob("*.json"))
    for path in jsons:
        try:
            result = json.loads(path.read_text())
            from .longctx.runner import format_table

            out.append(f"<h3>{html.escape(path.name)}</h3><pre>{html.escape(format_table(result))}</pre>")
        except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
            out.append(_missing(f"{path.name}: not a `qwerky longctx` result ({type(e).__name__}: {e})"))
    pngs = sorted(folder.glob("*.png"))
    for path in pngs:
        out.append(f"<figure>{_img(path.read_bytes(), path.name)}<figcaption>{html.escape(path.name)}"
                   "</figcaption></figure>")
    if not jsons and not pngs:
        out.append(_missing("longctx/ holds no .json or .png files"))
    return "".join(out)


CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}.missing{color:#a40;font-style:italic}img{max-width:100%}figure{display:inline-block}
pre{background:#f7f7f7;padding:.5em}"""


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN_DIR/report.html (or `out`) and return its path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    sections = [("Training", _training_section(run)), ("Quality (held-out)", _quality_section(run)),
                ("Long context", _longctx_section(run))]
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = "".join(f"<h2>{html.escape(t)}</h2>{s}" for t, s in sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>qwerky report: {html.escape(run.name)}</title>"
            f"<style>{CSS}</style></head><body><h1>qwerky report: {html.escape(str(run))}</h1>"
            f"<p>generated {stamp}</p>{body}</body></html>")
    path = Path(out) if out else run / "report.html"
    path.write_text(page)
    return path


def render_report_md(report: dict[str, Any]) -> str:
    """report.md of a conversion (its report.json as a dict): warnings, quality table (teacher, student, window
    baseline), what each stage bought, the hybrid choice, the stage guard and per-stage costs."""
    sections = (_md_header, _md_quality, _md_by_stage, _md_hybrid, _md_guard, _md_stages)
    return "\n".join(line for section in sections for line in section(report))


def _md_header(report: dict[str, Any]) -> list[str]:
    lines = ["# qwerky conversion report", "", f"Teacher: `{report['teacher']}`  ", f"Student: `{report['out']}`  ",
             f"Wall time: {report['wall_s']} s", ""]
    tc = report.get("teacher_context")
    if tc:
        lines += [f"Teacher context: {tc['message']}.", ""]
        lines += [f"**Warning:** {w}." for w in tc.get("warnings", [])] + ([""] if tc.get("warnings") else [])
    g = report.get("guard") or {}
    for e in (g.get("stages") or {}).values():
        if e.get("regressed"):
            lines += [f"**Warning:** {e['message']}", ""]
    if g.get("kept") and report.get("stages") and g["kept"] != f"stage{report['stages'][-1]['stage']}":
        lines += [f"Exported: the weights after {g['kept']} (train.keep={g['keep']}); the quality table is theirs.", ""]
    return lines


def _md_quality(report: dict[str, Any]) -> list[str]:
    q = report.get("quality")
    if not q:
        return []
    lines = ["## Held-out quality", "", "| model | perplexity | ppl / teacher | KL(teacher‖model) | top-1 agreement |",
             "|---|---|---|---|---|"]
    t_ppl = q.get("teacher", {}).get("ppl")
    for name in ("teacher", "student", "baseline"):
        m = q.get(name)
        if not m:
            continue
        ratio = m["ppl"] / t_ppl if t_ppl else float("nan")
        kl, agree = m.get("kl"), m.get("top1")
        label = {"baseline": "window baseline (64 + 4 sinks)"}.get(name, name)
        lines.append(f"| {label} | {m['ppl']:.3f} | {ratio:.3f} | "
                     f"{'-' if kl is None else f'{kl:.4f}'} | {'-' if agree is None else f'{agree:.1%}'} |")
    return [*lines, ""]


def _md_by_stage(report: dict[str, Any]) -> list[str]:
    by_stage = report.get("quality_by_stage") or {}
    if not by_stage:
        return []
    lines = [f"## What each stage bought (at the common {report.get('data', {}).get('eval_seq_len', '')}-token "
             "context)", "", "| after | student ppl / teacher | KL | top-1 agreement |", "|---|---|---|---|"]
    for key, q in by_stage.items():
        s, t = q.get("student", {}), q.get("teacher", {})
        ratio = s.get("ppl", float("nan")) / t.get("ppl", float("nan"))
        lines.append(f"| {key} | {ratio:.3f} | {s.get('kl', float('nan')):.4f} | {s.get('top1', float('nan')):.1%} |")
    return [*lines, ""]


def _md_hybrid(report: dict[str, Any]) -> list[str]:
    hy = report.get("hybrid")
    if not hy:
        return []
    lines = [f"## Hybrid: {hy['keep']} layers keep the teacher's attention ({hy['layers']})", ""]
    for step in hy.get("greedy", []):
        cands = ", ".join(f"{i}: {kl:.4f}" for i, kl in step["candidates"].items())
        lines.append(f"- greedy step {len(step['layers'])}: keep layer {step['added']} (KL with each candidate "
                     f"kept: {cands})")
    lines += ["", "Cost of converting each layer alone after stage 1 (KL): "
              + ", ".join(f"{i}: {c:.4f}" for i, c in enumerate(hy["costs"])), "",
              f"| kept | auto (greedy): layers | KL | top-1 | one at a time: layers | KL | top-1 | "
              f"random: layers | KL | top-1 | memory / sequence at {hy['memory_context']} |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]

    def cells(entry: dict[str, Any] | None) -> str:
        return "- | - | -" if entry is None else f"{entry['layers']} | {entry['kl']:.4f} | {entry['top1']:.1%}"

    for row in hy["curve"]:
        ranked = row.get("ranked", row.get("auto"))  # reports written before the greedy choice
        lines.append(f"| {row['keep']} | {cells(row.get('auto'))} | {cells(ranked)} | {cells(row['random'])} | "
                     f"{row['memory_bytes_at_8k'] / 2**20:.2f} MiB |")
    return [*lines, "", "(after stage 1, every other layer converted; measured on the teacher with hooks)", ""]


def _md_guard(report: dict[str, Any]) -> list[str]:
    stages = (report.get("guard") or {}).get("stages")
    if not stages:
        return []
    lines = ["## Stage guard (each stage at its own training context: before -> after)", "",
             "| stage | context | KL | top-1 agreement | verdict |", "|---|---|---|---|---|"]
    for key, e in stages.items():
        if "after" not in e:
            continue
        b, a = e["before"]["student"], e["after"]["student"]
        verdict = ("worse: " if e["regressed"] else "") + e["action"]
        lines.append(f"| {key} | {e['seq_len']} | {b['kl']:.4f} -> {a['kl']:.4f} | {b['top1']:.1%} -> "
                     f"{a['top1']:.1%} | {verdict} |")
    return [*lines, ""]


def _md_stages(report: dict[str, Any]) -> list[str]:
    if not report.get("stages"):
        return []
    lines = ["## Stages", "", "| stage | what | tokens | seq len | wall s | tokens/s | GFLOP/s | peak RSS GiB | "
             "final loss |", "|---|---|---|---|---|---|---|---|---|"]
    for s in report["stages"]:  # GFLOP/s: train/flops.py; reports written before it have none
        lines.append(f"| {s['stage']} | {s['name']} | {s['tokens']:,} | {s['seq_len']} | {s['wall_s']} | "
                     f"{s['tokens_per_s']:,.0f} | {s.get('gflop_s', '-')} | {s.get('peak_rss_gib', '-')} | "
                     f"{s['final_loss']:.4f} |")
    return [*lines, ""]
