"""Issue 6: the windowed student (exact softmax over the last 64 tokens + 4 sinks, plus an RWKV-7 state for
everything older) against the training-free window baseline and the pure RWKV-7 student, same token budget.

    python benchmarks/window_student.py                    # converts both students (~25 min on 2 CPU cores)
    python benchmarks/window_student.py --rwkv7 /tmp/demo --window /tmp/win   # reuse finished conversions

    # a teacher pre-trained on long documents (scripts/train_teacher.py --seq-len 2048 ...), on a GPU:
    python benchmarks/window_student.py --teacher /tmp/long-teacher --data /tmp/long-teacher/mixture.jsonl.gz \
        --recipe long_context --work /tmp/long --json /tmp/long/window_student.json

Prints and writes (JSON): held-out KL / top-1 agreement / perplexity ratio at the training context;
passkey accuracy with the key placed beyond the window at 2x and 4x the training length; state memory per
sequence at 512 and 8192 tokens of context; decode speed of the window student relative to the RWKV-7 one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conversion_fidelity import run  # noqa: E402
from qwerky.eval.speed import decode_rate  # noqa: E402
from retrieval_probes import digit_score  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _convert_or_load(path: Path | None, default: Path, mixer: str, args: argparse.Namespace) -> Path:
    if path is not None and (path / "report.json").exists():
        return path
    out = path or default
    run(out, mixer, args.recipe, args.set, args.teacher, args.data, args.device)
    return out


@torch.no_grad()
def _memory_and_speed(models: dict[str, Any], contexts: list[int], steps: int, batch: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, model in models.items():
        row: dict[str, Any] = {}
        dev = next(model.parameters()).device
        for ctx in contexts:
            state = model.init_state(1)
            model(torch.randint(5, 1000, (1, ctx), device=dev), past_key_values=state, use_cache=True)
            row[f"state_bytes_at_{ctx}"] = state.nbytes()
        row["decode_tokens_per_s"] = decode_rate(model, batch, prefill=512, steps=steps)
        out[name] = row
    return out


@torch.no_grad()
def _answer_token_accuracy(models: dict[str, Any], tokenizer: Any, lengths: list[int], depths: list[float],
                           samples: int) -> dict[str, dict[str, float]]:
    """Teacher-forced: the share of the key's digits each model predicts top-1, given the prompt and the
    digits before it. A graded view of retrieval where exact-match accuracy is 0 for everyone; chance is
    about 10%, and the baseline cannot see the key. Same seeded prompts as the passkey table."""
    from qwerky.eval.longctx import make_samples

    items = make_samples("passkey", tokenizer, lengths, depths, samples, seed=0)
    out: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        per_len: dict[int, list[float]] = {}
        for s in items:
            per_len.setdefault(s.length, []).append(digit_score(model, tokenizer, s))
        out[name] = {str(n): 100 * sum(v) / len(v) for n, v in per_len.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rwkv7", type=Path, help="finished pure RWKV-7 student folder (else converted here)")
    p.add_argument("--window", type=Path, help="finished window student folder (else converted here)")
    p.add_argument("--teacher", type=Path, help="teacher folder (default: the embedded teacher)")
    p.add_argument("--data", type=Path, help="distillation text (default: python-docs-train)")
    p.add_argument("--recipe", default="default", help="recipe name or YAML path (both students)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--work", type=Path, default=Path("/tmp"), help="where converted students go")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides (both)")
    p.add_argument("--samples", type=int, default=6, help="passkey samples per length and depth")
    p.add_argument("--passkey-multiples", default="1,2,4",
                   help="passkey prompt lengths as multiples of the training length (1x shows the teacher can do it)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "window_student.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from qwerky.demo import TEACHER
    from qwerky.eval.longctx.runner import format_table, run_longctx
    from qwerky.surgery import convert_teacher, load_student
    from qwerky.teacher import load_teacher, load_tokenizer

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    args.device = device.type
    rwkv_dir = _convert_or_load(args.rwkv7, args.work / "qwerky-fidelity-rwkv7", "rwkv7", args)
    win_dir = _convert_or_load(args.window, args.work / "qwerky-fidelity-window", "window", args)
    reports = {n: json.loads((d / "report.json").read_text()) for n, d in (("rwkv7", rwkv_dir), ("window", win_dir))}
    q_r, q_w = reports["rwkv7"]["quality"], reports["window"]["quality"]
    quality = {"window baseline": q_w["baseline"], "rwkv7 student": q_r["student"], "window student": q_w["student"]}
    t_ppl = q_w["teacher"]["ppl"]
    tokens = {n: sum(s["tokens"] for s in r["stages"]) for n, r in reports.items()}
    train_len = max(s["seq_len"] for s in reports["window"]["stages"])

    print(f"held-out quality at the training context ({q_w['seq_len']} tokens), teacher ppl {t_ppl:.2f}")
    print("| model | distillation tokens | KL(teacher‖model) | top-1 agreement | ppl / teacher |")
    print("|---|---|---|---|---|")
    toks = {"window baseline": 0, "rwkv7 student": tokens["rwkv7"], "window student": tokens["window"]}
    for name, q in quality.items():
        print(f"| {name} | {toks[name]:,} | {q['kl']:.4f} | {q['top1']:.1%} | {q['ppl'] / t_ppl:.3f} |")

    teacher_dir = args.teacher or TEACHER
    teacher = load_teacher(teacher_dir).to(device)
    tokenizer = load_tokenizer(teacher_dir)
    models = {"teacher": teacher, "baseline": convert_teacher(teacher, mixer="window").eval(),
              "rwkv7": load_student(rwkv_dir).to(device), "window": load_student(win_dir).to(device)}
    lengths = [int(float(m) * train_len) for m in args.passkey_multiples.split(",")]
    # depths 10-50%: the key sits hundreds of tokens before the question, far outside the 64-token window
    depths = [0.1, 0.3, 0.5]
    passkey = run_longctx(models, tokenizer, "passkey", lengths, depths, args.samples, seed=0,
                          progress=lambda m: print("  " + m, file=sys.stderr))
    print(f"\npasskey, key beyond the window, at {args.passkey_multiples}x the training length ({train_len})")
    print(format_table(passkey))
    digits = _answer_token_accuracy(models, tokenizer, lengths, depths, args.samples)
    print("\nkey digits predicted (teacher-forced, %; chance ~10):")
    print("| model | " + " | ".join(str(n) for n in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for name, row in digits.items():
        print(f"| {name} | " + " | ".join(f"{row[str(n)]:.0f}" for n in lengths) + " |")

    perf = _memory_and_speed({"rwkv7": models["rwkv7"], "window": models["window"]}, [512, 8192], 64, 8)
    print(f"\n| student | state bytes at 512 | state bytes at 8192 | decode tok/s (batch 8, {device.type}) |")
    print("|---|---|---|---|")
    for name, row in perf.items():
        print(f"| {name} | {row['state_bytes_at_512']:,} | {row['state_bytes_at_8192']:,} | "
              f"{row['decode_tokens_per_s']:.0f} |")
    ratio = perf["window"]["decode_tokens_per_s"] / perf["rwkv7"]["decode_tokens_per_s"]
    print(f"window / rwkv7 decode speed: {ratio:.2f}x")

    for r in passkey["models"].values():
        r.pop("records", None)
    result = {"quality": quality, "teacher_ppl": t_ppl, "tokens": toks, "train_len": train_len,
              "passkey": passkey, "passkey_key_digits_teacher_forced": digits,
              "memory_and_speed": perf, "decode_ratio_window_over_rwkv7": ratio,
              "runs": {"rwkv7": str(rwkv_dir), "window": str(win_dir)},
              "teacher": str(teacher_dir), "data": str(args.data) if args.data else "python-docs-train",
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "wall_s": {n: r.get("wall_s") for n, r in reports.items()}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
