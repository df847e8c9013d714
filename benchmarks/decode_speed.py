"""Batched decode speed of converted students: tokens/s per mixer, as a ratio to the first one.

Students are made by weight transfer alone (`convert_teacher`; speed does not depend on training), or read
from finished folders. Each model prefills `--prefill` tokens for `--batch` sequences, then decodes one
token at a time; the models are timed in turns, `--repeats` rounds, so load from other processes falls on
all alike. Reported: median tokens/s and the ratio to the first model, measured in the same run.

    python benchmarks/decode_speed.py                                  # embedded teacher: rwkv7, window
    python benchmarks/decode_speed.py --mixers rwkv7,rwkv6,window --batch 32 --device cuda
    python benchmarks/decode_speed.py --students /tmp/a,/tmp/b         # finished student folders
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, help="teacher folder (default: the embedded teacher)")
    p.add_argument("--mixers", default="rwkv7,window", help="students made from the teacher by weight transfer")
    p.add_argument("--students", default="", help="comma-separated finished student folders (instead of --mixers)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "decode_speed.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from qwerky.demo import TEACHER
    from qwerky.eval.speed import decode_rate
    from qwerky.surgery import convert_teacher, load_student
    from qwerky.teacher import load_teacher

    device = torch.device(args.device)
    models: dict[str, Any] = {}
    if args.students:
        for path in args.students.split(","):
            models[path] = load_student(path).to(device).eval()
    else:
        for mixer in args.mixers.split(","):
            models[mixer] = convert_teacher(load_teacher(args.teacher or TEACHER), mixer=mixer).to(device).eval()
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            rates[name].append(decode_rate(model, args.batch, args.prefill, args.steps))
    first = statistics.median(rates[next(iter(models))])
    rows = [{"model": name, "tokens_per_s": statistics.median(r), "ratio": statistics.median(r) / first,
             "all": r} for name, r in rates.items()]
    print(f"decode, batch {args.batch}, after a {args.prefill}-token prefill, {args.device}, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print("| model | tokens/s | ratio |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['tokens_per_s']:.0f} | {row['ratio']:.2f}x |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
