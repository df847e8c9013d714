"""What the GGUF-exportable student costs or gains, and how fast llama.cpp runs it.

Converts the embedded teacher (or --teacher/--data/--heldout) with the exportable `arwkv7` student and
with the default RAD-RWKV7 student at one recipe and token budget, scores both and the window baseline
on the same held-out windows (KL(teacher||model), top-1 agreement), exports the arwkv7 student to GGUF
and measures, in the same run and on the same threads, llama.cpp's decode tokens/s (through
llama-cpp-python) against qwerky's own PyTorch decode of that student (qwerky.eval.speed.decode_run),
and the max logit difference between the two on a held-out window.

    python benchmarks/gguf_export.py --out /tmp/gguf-bench --scale 0.25

Prints a table and writes JSON (default benchmarks/results/gguf_export.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def llama_decode_rate(path: Path, prefill: int, steps: int, threads: int, vocab: int, seed: int = 0) -> float:
    """Tokens/s of `steps` single-token llama.cpp evals after a `prefill`-token random prompt."""
    import llama_cpp

    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (prefill,), generator=gen).tolist()
    tok = int(torch.randint(0, vocab, (1,), generator=gen))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=prefill + steps + 8, n_batch=max(prefill, 8), n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    llm.eval(prompt)
    llm.eval([tok])  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.eval([tok])
    rate = steps / (time.perf_counter() - t0)
    llm.close()
    return rate


def llama_logit_diff(path: Path, student: Any, window: list[int]) -> float:
    """Max |logit| difference between llama.cpp (this file) and the PyTorch student on one window."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=len(window) + 8, n_batch=len(window),
                          verbose=False)
    llm.eval(window)
    with torch.no_grad():
        ref = student(torch.tensor([window])).logits[0].float().numpy()
    diff = float(abs(llm.scores[: len(window)] - ref).max())
    llm.close()
    return diff


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path)
    p.add_argument("--data", type=Path)
    p.add_argument("--heldout", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--recipe", default="default")
    p.add_argument("--scale", type=float, default=0.25, help="multiply every stage's token budget")
    p.add_argument("--mixers", default="rwkv7,arwkv7", help="students to convert (arwkv7 is exported)")
    p.add_argument("--quants", default="f32,f16,q8_0", help="GGUF types to export and time")
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timings interleaved, best kept (a shared CPU is noisy)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "gguf_export.json")
    args = p.parse_args(argv)

    from qwerky.data import build_token_cache, heldout_windows
    from qwerky.demo import HELDOUT_TEXT, TEACHER, TRAIN_TEXT
    from qwerky.eval.quality import compare_models
    from qwerky.eval.speed import decode_run
    from qwerky.surgery import convert_teacher, load_student
    from qwerky.surgery.gguf_export import export_gguf
    from qwerky.teacher import load_teacher, load_tokenizer
    from qwerky.train import ConvertJob, load_recipe, run_conversion
    from qwerky.train.recipe import scaled_token_overrides

    teacher_dir = args.teacher or TEACHER
    data, held = args.data or TRAIN_TEXT, args.heldout or HELDOUT_TEXT
    base = load_recipe(args.recipe, list(args.set))
    sets = list(args.set)
    sets += scaled_token_overrides(base, args.scale)
    mixers = args.mixers.split(",")
    cache_dir = args.out / "token-cache"
    timings: dict[str, float] = {}
    for mixer in mixers:
        out = args.out / mixer
        if (out / "report.json").exists():
            print(f"{mixer}: reusing {out}")
            continue
        print(f"{mixer}: converting -> {out}", flush=True)
        t0 = time.perf_counter()
        recipe = load_recipe(args.recipe, [f"student.mixer={mixer}", *sets])
        run_conversion(ConvertJob(teacher=teacher_dir, out=out, recipe=recipe, data=[data], heldout=[held],
                                  overwrite=True, cache_dir=cache_dir))
        timings[mixer] = time.perf_counter() - t0

    teacher = load_teacher(teacher_dir)
    recipe = load_recipe(args.recipe, sets)
    cache = build_token_cache([data], load_tokenizer(teacher_dir), cache_dir, heldout_paths=[held],
                              heldout_fraction=recipe.data.heldout_fraction, seed=recipe.data.seed)
    windows = heldout_windows(cache.heldout, recipe.data.eval_seq_len, recipe.data.eval_windows)
    models: dict[str, Any] = {"window baseline (64 + 4 sinks)": convert_teacher(teacher, mixer="window").eval()}
    for mixer in mixers:
        models[mixer] = load_student(args.out / mixer)
    rows = []
    for name, model in models.items():
        with torch.no_grad():
            q = compare_models(teacher, model, windows)["student"]
        rows.append({"model": name, "kl": q["kl"], "top1": q["top1"], "ppl_ratio": q["ppl_ratio"],
                     "convert_s": timings.get(name)})

    speed = []
    if "arwkv7" in models:
        student = models["arwkv7"]
        threads = torch.get_num_threads()
        vocab = student.get_input_embeddings().num_embeddings
        window = windows[0].tolist()
        quants = args.quants.split(",")
        paths = {q: export_gguf(student, args.out / "arwkv7", args.out / f"arwkv7-{q}.gguf", quant=q) for q in quants}
        torch_rates: list[float] = []
        llama_rates: dict[str, list[float]] = {q: [] for q in quants}
        for _ in range(args.repeats):  # interleaved, so a burst of load elsewhere hits every engine alike
            torch_rates.append(decode_run(student, 1, args.prefill, args.steps)["tokens_per_s"])
            for q in quants:
                llama_rates[q].append(llama_decode_rate(paths[q], args.prefill, args.steps, threads, vocab))
        torch_rate = max(torch_rates)
        for q in quants:
            rate = max(llama_rates[q])
            speed.append({"quant": q, "file_mib": paths[q].stat().st_size / 2**20, "llama_cpp_tok_s": rate,
                          "pytorch_tok_s": torch_rate, "ratio": rate / torch_rate,
                          "max_logit_diff": llama_logit_diff(paths[q], student, window),
                          "llama_cpp_all": llama_rates[q], "pytorch_all": torch_rates})

    print(f"\nheld-out: {windows.shape[0]} windows of {windows.shape[1]} tokens; token budget x{args.scale} of "
          f"recipe '{args.recipe}'; {torch.get_num_threads()} CPU threads")
    print("| model | KL(teacher‖model) | top-1 | ppl / teacher |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['kl']:.4f} | {r['top1']:.1%} | {r['ppl_ratio']:.3f} |")
    if speed:
        print(f"\ndecode after a {args.prefill}-token prompt, {args.steps} single-token steps, batch 1, best of "
              f"{args.repeats}")
        print("| GGUF | file | llama.cpp tok/s | PyTorch tok/s | ratio | max logit diff vs PyTorch |")
        print("|---|---|---|---|---|---|")
        for s in speed:
            print(f"| {s['quant']} | {s['file_mib']:.1f} MiB | {s['llama_cpp_tok_s']:.0f} | {s['pytorch_tok_s']:.0f} | "
                  f"{s['ratio']:.2f}x | {s['max_logit_diff']:.2e} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                     "decode": speed}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
