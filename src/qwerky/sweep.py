"""`qwerky sweep`: one teacher, several student mixers, the same recipe and token budget, one table.

This is the research loop the method exists for: a new mixer registered in one file is compared with the
others and with the training-free window baseline (the teacher restricted to 64 tokens + 4 sinks) by one
command. Every model is scored on the same held-out windows at the recipe's training context:
KL(teacher || model), top-1 agreement and perplexity ratio; then memory per sequence and decode speed
against the teacher (its KV cache at `decode_context` tokens), timed in turns in the same run.

Each conversion is an ordinary `qwerky convert` into OUT/<mixer> (resumable; a finished one whose recipe
matches is reused), all sharing one token cache.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwerky.errors import QwerkyError

log = logging.getLogger(__name__)

BASELINE = "window baseline (64 + 4 sinks)"


@dataclass
class SweepJob:
    teacher: Path
    out: Path
    mixers: list[str]
    data: list[Path]
    heldout: list[Path] = field(default_factory=list)
    recipe: str = "default"
    sets: list[str] = field(default_factory=list)
    stages: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    seq_len: int = 0  # evaluation context (0: the longest enabled stage's seq_len)
    decode_context: int = 2048
    decode_batch: int = 8
    decode_steps: int = 32
    repeats: int = 3
    resume: bool = False
    device: str = "auto"


def _recipe_for(job: SweepJob, mixer: str) -> Any:
    from qwerky.train import load_recipe

    return load_recipe(job.recipe, [f"student.mixer={mixer}", *job.sets])


def _finished(out: Path, recipe: Any, stages: list[int]) -> bool:
    report = out / "report.json"
    if not report.exists():
        return False
    done = json.loads(report.read_text())
    ran = sorted(s["stage"] for s in done.get("stages", []))
    want = sorted(s for s in stages if s > 0 and recipe.stage(s).enabled)
    return done.get("recipe") == recipe.to_dict() and ran == want


def run_sweep(job: SweepJob) -> dict[str, Any]:
    """Convert with every mixer, evaluate all of them the same way, return (and write) the table."""
    from qwerky.surgery import convert_teacher, load_student
    from qwerky.teacher import load_teacher

    recipes = _check_mixers(job)  # every recipe validated before any work
    job.out.mkdir(parents=True, exist_ok=True)
    _convert_all(job, recipes)
    first = next(iter(recipes.values()))
    seq_len = job.seq_len or max((first.stage(s).seq_len for s in job.stages if s > 0 and first.stage(s).enabled),
                                 default=first.data.eval_seq_len)
    device = torch.device("cuda" if job.device == "auto" and torch.cuda.is_available()
                          else "cpu" if job.device == "auto" else job.device)
    teacher = load_teacher(job.teacher).to(device).eval()
    windows = _heldout(job, first, seq_len)
    print(f"evaluating {len(job.mixers)} students and the window baseline on {windows.shape[0]} held-out windows "
          f"of {seq_len} tokens", flush=True)
    models: dict[str, Any] = {BASELINE: convert_teacher(teacher, mixer="window").eval()}
    for mixer in job.mixers:
        models[mixer] = load_student(job.out / mixer, device=device)
    rows = _quality_rows(teacher, models, windows.to(device))
    teacher_rate = _decode_columns(job, teacher, models, rows)
    result = {
        "teacher": str(job.teacher), "recipe": {k: v for k, v in first.to_dict().items() if k != "student"},
        "stages": job.stages, "mixers": job.mixers, "eval": {"seq_len": seq_len, "windows": int(windows.shape[0]),
                                                             "tokens": int(windows.shape[0] * (seq_len - 1))},
        "decode": {"context": job.decode_context, "batch": job.decode_batch, "steps": job.decode_steps,
                   "repeats": job.repeats, "device": str(device), "teacher_tokens_per_s": teacher_rate},
        "training_tokens": {m: _training_tokens(job.out / m) for m in job.mixers},
        "rows": [{"model": name, **row} for name, row in rows.items()],  # a list: JSON keeps the order
    }
    from qwerky.train.checkpoint import atomic_write_bytes, atomic_write_json

    atomic_write_json(job.out / "sweep.json", result)
    atomic_write_bytes(job.out / "sweep.md", render_sweep_md(result).encode())
    return result


def _check_mixers(job: SweepJob) -> dict[str, Any]:
    """Each mixer's recipe, or a QwerkyError naming an unknown mixer (before anything is written)."""
    from qwerky.modeling.mixer_base import get_mixer

    if not job.mixers:
        raise QwerkyError("qwerky sweep needs at least one mixer (--mixers rwkv7,window,...)")
    for mixer in job.mixers:
        try:
            get_mixer(mixer)
        except ValueError as err:
            raise QwerkyError(f"--mixers: {err}") from None
    return {m: _recipe_for(job, m) for m in job.mixers}


def _convert_all(job: SweepJob, recipes: dict[str, Any]) -> None:
    """One conversion per mixer, sharing one token cache; a finished one (same recipe and stages) is reused."""
    from qwerky.train import ConvertJob, run_conversion

    for i, (mixer, recipe) in enumerate(recipes.items(), 1):
        out = job.out / mixer
        if _finished(out, recipe, job.stages):
            print(f"[{i}/{len(recipes)}] {mixer}: finished conversion in {out} reused")
            continue
        print(f"[{i}/{len(recipes)}] {mixer}: converting -> {out}", flush=True)
        run_conversion(ConvertJob(teacher=job.teacher, out=out, recipe=recipe, data=job.data, heldout=job.heldout,
                                  stages=job.stages, resume=job.resume, overwrite=not job.resume,
                                  device=job.device, cache_dir=job.out / "token-cache"))


def _heldout(job: SweepJob, recipe: Any, seq_len: int) -> torch.Tensor:
    from qwerky.data import build_token_cache, heldout_windows
    from qwerky.teacher import load_tokenizer

    cache = build_token_cache(job.data, load_tokenizer(job.teacher), job.out / "token-cache",
                              heldout_paths=job.heldout or None, heldout_fraction=recipe.data.heldout_fraction,
                              seed=recipe.data.seed, text_field=recipe.data.text_field)
    if len(cache.heldout) <= seq_len:
        raise QwerkyError(f"the held-out text has {len(cache.heldout)} tokens, too few for one {seq_len}-token "
                          "window; pass more --heldout text or a shorter --seq-len")
    return heldout_windows(cache.heldout, seq_len, recipe.data.eval_windows)


def _quality_rows(teacher: Any, models: dict[str, Any], windows: torch.Tensor) -> dict[str, dict[str, Any]]:
    from qwerky.eval.quality import compare_models

    rows: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for name, model in models.items():
            q = compare_models(teacher, model, windows)
            s = q["student"]
            rows[name] = {"kl": s["kl"], "top1": s["top1"], "ppl_ratio": s["ppl_ratio"],
                          "teacher_ppl": q["teacher"]["ppl"]}
    return rows


def _decode_columns(job: SweepJob, teacher: Any, models: dict[str, Any], rows: dict[str, dict[str, Any]]) -> float:
    """Decode speed (ratio to the teacher's, in turns) and state per sequence into `rows`, plus the teacher's row;
    returns the teacher's tokens/s."""
    from qwerky.eval.speed import decode_run

    timed = {"teacher": teacher, **models}
    rates: dict[str, list[float]] = {name: [] for name in timed}
    memory: dict[str, float] = {}
    for _ in range(job.repeats):  # in turns, so load from elsewhere falls on every model alike
        for name, model in timed.items():
            run = decode_run(model, job.decode_batch, job.decode_context, job.decode_steps)
            rates[name].append(run["tokens_per_s"])
            memory[name] = run["bytes_per_sequence"]
    teacher_rate = statistics.median(rates["teacher"])
    # the baseline is the teacher with a KV cache of window + sinks tokens; its implementation here (the window
    # student at a zero gate) also carries an unused recurrent state, which the baseline itself would not
    kv_per_token = memory["teacher"] / (job.decode_context + job.decode_steps + 1)
    opts = models[BASELINE].mixers[0].options
    memory[BASELINE] = kv_per_token * min(job.decode_context, opts.window_size + opts.num_sinks)
    for name in models:
        rows[name]["state_bytes_per_sequence"] = memory[name]
        rows[name]["decode_ratio"] = statistics.median(rates[name]) / teacher_rate
        rows[name]["mixer"] = "window" if name == BASELINE else name
    rows["teacher"] = {"kl": 0.0, "top1": 1.0, "ppl_ratio": 1.0, "state_bytes_per_sequence": memory["teacher"],
                       "decode_ratio": 1.0, "mixer": "softmax attention (KV cache)"}
    return teacher_rate


def _training_tokens(out: Path) -> int:
    report = json.loads((out / "report.json").read_text())
    return int(sum(s["tokens"] for s in report.get("stages", [])))


def render_sweep_md(result: dict[str, Any]) -> str:
    ev, dec = result["eval"], result["decode"]
    lines = [f"Held-out: {ev['windows']} windows of {ev['seq_len']} tokens; decode: {dec['batch']} sequences after "
             f"{dec['context']} tokens of context, {dec['device']}, ratio to the teacher in the same run "
             f"(median of {dec['repeats']})", "",
             "| model | training tokens | KL(teacher‖model) | top-1 agreement | ppl / teacher | state per sequence "
             f"at {dec['context']} | decode tokens/s vs teacher |",
             "|---|---|---|---|---|---|---|"]
    tokens = result.get("training_tokens", {})
    for row in result["rows"]:
        name = row["model"]
        spent = tokens.get(name, 0)
        lines.append(f"| {name} | {spent:,} | {row['kl']:.4f} | {row['top1']:.1%} | {row['ppl_ratio']:.3f} | "
                     f"{_size(row['state_bytes_per_sequence'])} | {row['decode_ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def _size(n: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def add_sweep_arguments(p: Any) -> None:
    p.add_argument("--teacher", type=Path,
                   help="teacher folder or .gguf file (default: the embedded teacher and its text)")
    p.add_argument("--data", nargs="*", default=[], help="training text (default with the embedded teacher: its own)")
    p.add_argument("--heldout", nargs="*", default=[], help="held-out text (default: a split of --data)")
    p.add_argument("--out", type=Path, default=Path("qwerky-sweep"), help="folder for the students and the table")
    p.add_argument("--mixers", default="", help="comma list of registered mixers (default: every one)")
    p.add_argument("--recipe", default="default", help="recipe shared by every student (name or YAML path)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override, applied to every student")
    p.add_argument("--stages", default="1,2,3,4", help="stages to run (default 1,2,3,4)")
    p.add_argument("--seq-len", type=int, default=0, help="evaluation context (default: longest training seq_len)")
    p.add_argument("--decode-context", type=int, default=2048, help="tokens of context before timed decoding")
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--resume", action="store_true", help="continue unfinished conversions from their checkpoints")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, help="also write the result JSON here")


def sweep_main(args: Any) -> int:
    from qwerky.demo import HELDOUT_TEXT, TEACHER, TRAIN_TEXT
    from qwerky.modeling.mixer_base import mixer_names

    if args.teacher is None:
        if args.data or args.heldout:
            raise QwerkyError("--data/--heldout need --teacher (without it the sweep uses the embedded teacher)")
        args.teacher, args.data, args.heldout = TEACHER, [TRAIN_TEXT], [HELDOUT_TEXT]
    elif not args.data:
        raise QwerkyError("qwerky sweep --teacher T needs --data (text to distil on)")
    try:
        stages = sorted({int(s) for s in args.stages.split(",") if s.strip()})
    except ValueError:
        raise QwerkyError(f"--stages expects a comma list like 1,2,3,4, got {args.stages!r}") from None
    mixers = [m.strip() for m in args.mixers.split(",") if m.strip()] or mixer_names()
    job = SweepJob(teacher=Path(args.teacher), out=args.out, mixers=mixers, data=[Path(p) for p in args.data],
                   heldout=[Path(p) for p in args.heldout], recipe=args.recipe, sets=list(args.set or []),
                   stages=stages, seq_len=args.seq_len, decode_context=args.decode_context,
                   decode_batch=args.decode_batch, decode_steps=args.decode_steps, resume=args.resume,
                   device=args.device)
    result = run_sweep(job)
    print(render_sweep_md(result))
    print(f"wrote {job.out / 'sweep.json'} and {job.out / 'sweep.md'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(copy.deepcopy(result), indent=2))
    return 0
