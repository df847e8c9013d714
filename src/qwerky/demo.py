"""`qwerky demo`: the whole conversion on the embedded teacher, on any machine, offline.

The embedded teacher (a small Qwen2: GQA, RoPE, q/k/v biases) and its text ship inside the package
(`qwerky/assets/`, trained by scripts/train_teacher.py), so this needs no download and no GPU.
"""

from __future__ import annotations

from pathlib import Path

from qwerky.errors import QwerkyError

ASSETS = Path(__file__).resolve().parent / "assets"
TEACHER = ASSETS / "teacher"
TRAIN_TEXT = ASSETS / "corpus" / "python-docs-train.jsonl.gz"
HELDOUT_TEXT = ASSETS / "corpus" / "python-docs-validation.jsonl.gz"


def run_demo(out: Path, overwrite: bool = True, sets: list[str] | None = None) -> int:
    from qwerky.train import ConvertJob, load_recipe, run_conversion
    from qwerky.train.pipeline import render_report_md

    for path in (TEACHER / "config.json", TRAIN_TEXT, HELDOUT_TEXT):
        if not path.exists():
            raise QwerkyError(f"embedded asset missing: {path} (reinstall qwerky)")
    recipe = load_recipe("default", sets or [])
    job = ConvertJob(teacher=TEACHER, out=out, recipe=recipe, data=[TRAIN_TEXT], heldout=[HELDOUT_TEXT],
                     overwrite=overwrite)
    print(f"qwerky demo: converting the embedded teacher ({TEACHER}) -> {out}")
    report = run_conversion(job)
    print(render_report_md(report))
    print(f"student written to {out}; try: qwerky generate {out} --prompt 'The list type'")
    return 0
