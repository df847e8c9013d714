"""The hybrid curve: KL / top-1 of trained students keeping K = 0, 1, 2 layers as the teacher's attention,
the K chosen automatically (`--keep-attention auto:K`: greedily on held-out KL after stage 1) against K
chosen at random, beside the window baseline; memory per sequence measured after an 8k-token prefill.

    python benchmarks/hybrid_curve.py --out /tmp/hybrid                      # embedded teacher, default recipe
    python benchmarks/hybrid_curve.py --out /tmp/hybrid --scale 0.25         # a quarter of the recipe's tokens
    python benchmarks/hybrid_curve.py --teacher T --data D --heldout H --mixer rwkv7 --ks 0,1,2

Every conversion is a plain `qwerky convert` (same recipe, data and budget); all models are then scored on
the same held-out windows. Prints a table and writes JSON (default benchmarks/results/hybrid_curve.json).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path)
    p.add_argument("--data", type=Path)
    p.add_argument("--heldout", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mixer", default="rwkv7")
    p.add_argument("--recipe", default="default")
    p.add_argument("--ks", default="0,1,2", help="numbers of kept attention layers")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's token budget")
    p.add_argument("--seed", type=int, default=0, help="for the random choice")
    p.add_argument("--memory-context", type=int, default=8192)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "hybrid_curve.json")
    args = p.parse_args(argv)

    from qwerky.data import build_token_cache, heldout_windows
    from qwerky.demo import HELDOUT_TEXT, TEACHER, TRAIN_TEXT
    from qwerky.eval.quality import compare_models
    from qwerky.eval.speed import decode_run
    from qwerky.surgery import convert_teacher, load_student
    from qwerky.teacher import load_teacher, load_tokenizer
    from qwerky.train import ConvertJob, load_recipe, run_conversion
    from qwerky.train.recipe import scaled_token_overrides

    teacher_dir = args.teacher or TEACHER
    data, held = args.data or TRAIN_TEXT, args.heldout or HELDOUT_TEXT
    base = load_recipe(args.recipe, [f"student.mixer={args.mixer}", *args.set])
    sets = [f"student.mixer={args.mixer}", *args.set]
    sets += scaled_token_overrides(base, args.scale)
    teacher = load_teacher(teacher_dir)
    n_layers = teacher.config.num_hidden_layers
    rng = random.Random(args.seed)
    variants: dict[str, list[str]] = {}
    for k in (int(x) for x in args.ks.split(",")):
        if k == 0:
            variants["K=0"] = []
        else:
            variants[f"K={k} auto"] = [f"student.keep_attention=auto:{k}"]
            layers = sorted(rng.sample(range(n_layers), k))
            variants[f"K={k} random"] = [f"student.attention_layers={','.join(map(str, layers))}"]
    cache_dir = args.out / "token-cache"
    for name, extra in variants.items():
        out = args.out / name.replace(" ", "-").replace("=", "")
        if (out / "report.json").exists():
            print(f"{name}: reusing {out}")
            continue
        print(f"{name}: converting -> {out}", flush=True)
        run_conversion(ConvertJob(teacher=teacher_dir, out=out, recipe=load_recipe(args.recipe, [*sets, *extra]),
                                  data=[data], heldout=[held], overwrite=True, cache_dir=cache_dir))

    recipe = load_recipe(args.recipe, sets)
    cache = build_token_cache([data], load_tokenizer(teacher_dir), cache_dir, heldout_paths=[held],
                              heldout_fraction=recipe.data.heldout_fraction, seed=recipe.data.seed)
    windows = heldout_windows(cache.heldout, recipe.data.eval_seq_len, recipe.data.eval_windows)
    models: dict[str, Any] = {"window baseline (64 + 4 sinks)": convert_teacher(teacher, mixer="window").eval()}
    for name in variants:
        models[name] = load_student(args.out / name.replace(" ", "-").replace("=", ""))
    rows = []
    for name, model in models.items():
        with torch.no_grad():
            q = compare_models(teacher, model, windows)["student"]
        memory = decode_run(model, 1, args.memory_context, 1)["bytes_per_sequence"]
        layers = list(getattr(model.config, "attention_layers", [])) if name in variants else None
        rows.append({"model": name, "attention_layers": layers, "kl": q["kl"], "top1": q["top1"],
                     "ppl_ratio": q["ppl_ratio"], "bytes_per_sequence": memory})
    teacher_memory = decode_run(teacher, 1, args.memory_context, 1)["bytes_per_sequence"]
    rows.append({"model": "teacher", "attention_layers": list(range(n_layers)), "kl": 0.0, "top1": 1.0,
                 "ppl_ratio": 1.0, "bytes_per_sequence": teacher_memory})
    print(f"\nheld-out: {windows.shape[0]} windows of {windows.shape[1]} tokens; memory after a "
          f"{args.memory_context}-token prefill; token budget x{args.scale} of recipe '{args.recipe}'")
    print(f"| model | attention layers | KL(teacher‖model) | top-1 | ppl / teacher | memory / sequence at "
          f"{args.memory_context} |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        layers = "-" if r["attention_layers"] is None else r["attention_layers"]
        print(f"| {r['model']} | {layers} | {r['kl']:.4f} | {r['top1']:.1%} | {r['ppl_ratio']:.3f} | "
              f"{r['bytes_per_sequence'] / 2**20:.2f} MiB |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
