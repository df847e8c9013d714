"""What each distillation stage buys: convert a teacher pre-trained on the Python docs and print, after
every stage, the student's held-out perplexity ratio, KL(teacher || student) and top-1 agreement, beside
the training-free window baseline (64 tokens + 4 sinks).

    python benchmarks/conversion_fidelity.py                       # embedded teacher, ../shared/data text
    python benchmarks/conversion_fidelity.py --mixer window --out /tmp/fid-window
    python benchmarks/conversion_fidelity.py --reuse /tmp/fid      # re-print a finished run's table

The embedded teacher (src/qwerky/assets/teacher) was pre-trained on python-docs-train by
scripts/train_teacher.py; held-out numbers use python-docs-validation, which it never saw.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _text_paths() -> tuple[Path, Path]:
    from qwerky.demo import HELDOUT_TEXT, TRAIN_TEXT

    train, held = SHARED / "python-docs-train.jsonl.gz", SHARED / "python-docs-validation.jsonl.gz"
    if train.exists() and held.exists():
        return train, held
    return TRAIN_TEXT, HELDOUT_TEXT  # the same files, shipped inside the package


def run(out: Path, mixer: str, recipe: str, sets: list[str], teacher: Path | None, data: Path | None = None,
        device: str = "auto") -> dict[str, Any]:
    """Convert `teacher` (default: the embedded one) on `data` (default: python-docs-train), held out on
    python-docs-validation."""
    from qwerky.demo import TEACHER
    from qwerky.train import ConvertJob, load_recipe, run_conversion

    train, held = _text_paths()
    job = ConvertJob(teacher=teacher or TEACHER, out=out, recipe=load_recipe(recipe, [f"student.mixer={mixer}", *sets]),
                     data=[data or train], heldout=[held], overwrite=True, device=device)
    return run_conversion(job)


def stage_table(report: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    rows = []
    tokens = 0
    by_stage = {s["stage"]: s for s in report.get("stages", [])}
    for key, q in report["quality_by_stage"].items():
        n = int(key.replace("stage", ""))
        tokens += by_stage.get(n, {}).get("tokens", 0)
        s, t, b = q["student"], q["teacher"], q.get("baseline", {})
        rows.append({"after": key, "tokens": tokens, "ppl_ratio": s["ppl"] / t["ppl"], "kl": s["kl"], "top1": s["top1"],
                     "baseline_kl": b.get("kl"), "baseline_top1": b.get("top1"),
                     "baseline_ppl_ratio": b["ppl"] / t["ppl"] if b else None})
    lines = ["| after | tokens (total) | student ppl / teacher | KL(teacher‖student) | top-1 agreement |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['after']} | {r['tokens']:,} | {r['ppl_ratio']:.3f} | {r['kl']:.4f} | {r['top1']:.1%} |")
    last = rows[-1]
    if last["baseline_kl"] is not None:
        lines.append(f"| window baseline (64 + 4 sinks, no training) | 0 | {last['baseline_ppl_ratio']:.3f} | "
                     f"{last['baseline_kl']:.4f} | {last['baseline_top1']:.1%} |")
    t_ppl = report["quality"]["teacher"]["ppl"]
    lines.append(f"\nteacher held-out perplexity {t_ppl:.2f} on {report['data']['eval_windows']} windows of "
                 f"{report['data']['eval_seq_len']} tokens; wall time {report['wall_s']} s")
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/qwerky-fidelity", help="student folder (run dir: OUT.run)")
    p.add_argument("--mixer", default="rwkv7", help="a registered student mixer (`qwerky mixers` lists them)")
    p.add_argument("--recipe", default="default")
    p.add_argument("--teacher", type=Path, default=None, help="default: the embedded teacher")
    p.add_argument("--data", type=Path, default=None, help="distillation text (default: python-docs-train)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--reuse", type=Path, help="a finished student folder: only print its table")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "conversion_fidelity.json"))
    args = p.parse_args(argv)
    if args.reuse:
        report = json.loads((args.reuse / "report.json").read_text())
    else:
        report = run(Path(args.out), args.mixer, args.recipe, args.set, args.teacher, args.data, args.device)
    table, rows = stage_table(report)
    print(f"conversion fidelity: mixer {report['recipe']['student']['mixer']}, recipe {report['recipe']['name']}")
    print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "report": report}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
