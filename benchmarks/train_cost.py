"""What a conversion costs on this machine, against what the machine can do, and against `qwerky plan`.

    python benchmarks/train_cost.py                                  # SmolLM2-135M at /work/data/smollm2-hf
    python benchmarks/train_cost.py --teacher DIR --data FILE.jsonl.gz --threads 1
    python benchmarks/train_cost.py --quick                          # the embedded tiny teacher, a minute
    PYTHONPATH=/old/checkout/src python benchmarks/train_cost.py --label before --old-code --micro1 2

In one run, at one thread count:
1. this CPU's dense fp32 matmul rate (torch.mm of 1024^2 and 2048^2, median of 5; before and after the
   stages, both reported: the machine is shared and its rate moves);
2. a short stage 1 and stage 2 through `qwerky convert --no-eval` (the real pipeline, real data), each
   stage's tokens/s, achieved GFLOP/s (tokens/s x the FLOPs a step runs per token, train/flops.py), CPU
   seconds and peak resident memory (reset at the stage's start) read from the run's report;
3. held-out evaluation's forward pass (teacher and stage-0 student on 512-token windows, no grad), timed here;
4. `qwerky plan`'s prediction for the same stages on this machine (its measured matmul rate given).

Utilisation = achieved / matmul FLOP/s. Prints one table and writes JSON under --out
(benchmarks/measured/cpu-2026-12-06-cost/ by default). `--old-code` reads the FLOPs the code before this
benchmark ran (stage 1 through the student's full forward, the KL's head recomputed) for a before/after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SMOL = Path("/work/data/smollm2-hf")
DATA = Path("/work/shared/data/python-docs-train.jsonl.gz")
HELDOUT = Path("/work/shared/data/python-docs-validation.jsonl.gz")
DEFAULT_OUT = ROOT / "benchmarks" / "measured" / "cpu-2026-12-06-cost"


def matmul_rate(threads: int) -> dict[str, float]:
    """Dense fp32 matmul GFLOP/s per wall second (what a run gets under this load) and per CPU second of this
    process (what a core does when it runs: robust to other processes)."""
    from qwerky.train.flops import matmul_gflops

    torch.set_num_threads(threads)
    rates = [matmul_gflops(sizes=(1024, 2048), repeats=5) for _ in range(3)]
    cpu = [matmul_gflops(sizes=(1024, 2048), repeats=5, clock=time.process_time) for _ in range(3)]
    return {"gflops": statistics.median(rates), "min": min(rates), "max": max(rates),
            "gflops_per_cpu_s": statistics.median(cpu)}


def peak_child_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def run_convert(args: argparse.Namespace, out: Path, threads: int, stages: str = "1,2") -> dict[str, Any]:
    sets = [f"train.threads={threads}",
            f"stage1.tokens={args.tokens1}", f"stage1.batch_size={args.batch}", f"stage1.seq_len={args.seq}",
            f"stage1.micro_batch_size={args.micro1}", "stage1.warmup_steps=1",
            f"stage2.tokens={args.tokens2}", f"stage2.batch_size={args.batch}", f"stage2.seq_len={args.seq}",
            f"stage2.micro_batch_size={args.micro2}", "stage2.warmup_steps=1",
            f"train.activation_checkpointing={args.checkpointing}"]
    cmd = [sys.executable, "-m", "qwerky", "convert", "--teacher", str(args.teacher), "--data", str(args.data),
           "--out", str(out), "--overwrite", "--stages", stages, "--no-eval", *[x for s in sets for x in ("--set", s)]]
    timed = Path("/usr/bin/time").exists()
    if timed:  # the process's own peak RSS (KiB), printed last on stderr
        cmd = ["/usr/bin/time", "-f", "maxrss_kib=%M", *cmd]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"qwerky convert failed:\n{res.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    peak = peak_child_rss_gib()
    if timed:
        line = [x for x in res.stderr.splitlines() if x.startswith("maxrss_kib=")][-1]
        peak = int(line.split("=")[1]) / 2**20
    return {"report": report, "wall_s": round(wall, 1), "process_peak_rss_gib": round(peak, 2),
            "stdout": res.stdout[-2000:], "sets": sets}


def eval_forward(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """Held-out evaluation's forward: the teacher and its stage-0 student on `--eval-windows` windows."""
    from qwerky.data import build_token_cache, heldout_windows
    from qwerky.surgery import convert_teacher
    from qwerky.teacher import load_teacher, load_tokenizer
    from qwerky.train.flops import FlopModel
    from qwerky.train.loop import peak_rss_bytes, peak_rss_reset

    torch.set_num_threads(threads)
    teacher = load_teacher(args.teacher)
    student = convert_teacher(teacher, mixer="rwkv7").eval()
    cache = build_token_cache([args.data], load_tokenizer(args.teacher), args.work / "eval-cache",
                              heldout_paths=[args.heldout] if args.heldout else None)
    windows = heldout_windows(cache.heldout, args.seq, args.eval_windows)
    per_token = FlopModel.from_models(teacher, student).eval_flops(args.seq)
    peak_rss_reset()
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for row in windows.split(args.eval_batch):
            teacher(input_ids=row, use_cache=False)
            student(input_ids=row)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = windows.numel()
    return {"tokens": tokens, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "tokens_per_s": round(tokens / wall, 1),
            "flops_per_token": round(per_token), "gflop_s": round(tokens * per_token / wall / 1e9, 2),
            "peak_rss_gib": round(peak_rss_bytes() / 2**30, 2)}


def plan_for(args: argparse.Namespace, run_sets: list[str], gflops: float, threads: int, old: bool
             ) -> dict[str, Any]:
    from qwerky.plan import make_plan
    from qwerky.teacher import load_config
    from qwerky.train.memory import machine_ram_bytes
    from qwerky.train.recipe import load_recipe

    recipe = load_recipe("default", run_sets)
    cpu = {"ram_bytes": machine_ram_bytes(), "gflops": gflops, "gflops_source": "measured", "threads": threads,
           "threads_reason": "benchmark", "utilisation": None, "checkpointing": args.checkpointing}
    plan = make_plan(load_config(args.teacher), 0, 0.0, 0.0, 0.0, recipe, cpu=cpu)
    if old:
        plan["note"] = "plan of the current code (the old code's memory differs)"
    return plan


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, default=SMOL)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--heldout", type=Path, default=HELDOUT)
    p.add_argument("--threads", type=int, default=1, help="torch threads for everything (default 1: see docs)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro1", type=int, default=0, help="stage1.micro_batch_size (0: the whole batch)")
    p.add_argument("--micro2", type=int, default=0, help="stage2.micro_batch_size (0: the whole batch)")
    p.add_argument("--tokens1", type=int, default=8192)
    p.add_argument("--tokens2", type=int, default=4096)
    p.add_argument("--checkpointing", default="auto", help="train.activation_checkpointing")
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="the embedded tiny teacher, small budgets")
    p.add_argument("--old-code", action="store_true",
                   help="the code run is the one before this benchmark (its FLOPs per token are read that way)")
    p.add_argument("--separate-stages", action="store_true",
                   help="each stage in its own convert process (per-stage process peak RSS, e.g. for old code)")
    p.add_argument("--label", default="after")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--work", type=Path, default=Path("/tmp/qwerky-train-cost"))
    args = p.parse_args()
    if args.quick:
        from qwerky.demo import HELDOUT_TEXT, TEACHER, TRAIN_TEXT  # the tiny teacher shipped in the package

        args.teacher, args.data, args.heldout = TEACHER, TRAIN_TEXT, HELDOUT_TEXT
        args.batch, args.seq, args.tokens1, args.tokens2, args.eval_windows = 4, 128, 1024, 1024, 4
    args.work.mkdir(parents=True, exist_ok=True)
    threads = args.threads
    t_start = time.perf_counter()
    load_before = os.getloadavg()[0]
    mm_before = matmul_rate(threads)
    if args.separate_stages:  # one process per stage: its peak RSS is the stage's (plus loading and stage 0)
        runs = [run_convert(args, args.work / f"student-{args.label}-{n}", threads, str(n)) for n in (1, 2)]
        conv = {**runs[1], "report": {"stages": [r["report"]["stages"][0] for r in runs]},
                "wall_s": sum(r["wall_s"] for r in runs),
                "process_peak_rss_gib": max(r["process_peak_rss_gib"] for r in runs),
                "stage_process_peak_rss_gib": [r["process_peak_rss_gib"] for r in runs]}
    else:
        conv = run_convert(args, args.work / f"student-{args.label}", threads)
    ev = eval_forward(args, threads)
    mm_after = matmul_rate(threads)
    peak = statistics.mean([mm_before["gflops"], mm_after["gflops"]])
    peak_cpu = statistics.mean([mm_before["gflops_per_cpu_s"], mm_after["gflops_per_cpu_s"]])
    from qwerky.train.flops import FlopModel  # noqa: F401
    plan = plan_for(args, conv["sets"], peak, threads, args.old_code)
    rows = []
    for s in conv["report"]["stages"]:
        planned = next(st for st in plan["stages"] if st["stage"] == s["stage"])
        gflop_s = s.get("gflop_s")
        if args.old_code or not gflop_s:  # the code before: FLOPs per token of its own path
            from qwerky.plan import _skeletons
            from qwerky.teacher import load_config
            from qwerky.train.flops import FlopModel as FM
            from qwerky.train.recipe import load_recipe

            t, st_model, _ = _skeletons(load_config(args.teacher), load_recipe("default", conv["sets"]))
            per = FM.from_models(t, st_model).step_flops(s["stage"], args.seq, recompute_head=True,
                                                         stage1_student_forward=True)["total"]
            gflop_s = s["tokens_per_s"] * per / 1e9
            s["flops_per_token"] = round(per)
        rows.append({"stage": s["stage"], "tokens": s["tokens"], "wall_s": s["wall_s"], "cpu_s": s.get("cpu_s"),
                     "tokens_per_s": s["tokens_per_s"], "flops_per_token": s.get("flops_per_token"),
                     "gflop_s": round(gflop_s, 2), "utilisation": round(gflop_s / peak, 3),
                     "utilisation_cpu": (round(s["tokens"] * s["flops_per_token"] / s["cpu_s"] / 1e9 / peak_cpu, 3)
                                         if s.get("cpu_s") else None),
                     "peak_rss_gib": s.get("peak_rss_gib"), "micro_batch": s.get("micro_batch_size"),
                     "rss_start_gib": s.get("rss_start_gib"),
                     "process_peak_rss_gib": (conv["stage_process_peak_rss_gib"][s["stage"] - 1]
                                              if "stage_process_peak_rss_gib" in conv else None),
                     "planned_rss_gib": planned["memory_gib"],
                     "planned_rss_gib_without_guard": round(planned["memory_gib"]
                                                            - planned["memory_parts_gib"]["guard_snapshot"], 2),
                     "planned_tokens_per_s": planned["tokens_per_s"],
                     "planned_wall_s": round(s["tokens"] / planned["tokens_per_s"], 1),
                     "planned_checkpointing": planned["activation_checkpointing"]})
    rows.append({"stage": "eval", "tokens": ev["tokens"], "wall_s": ev["wall_s"], "cpu_s": ev["cpu_s"],
                 "tokens_per_s": ev["tokens_per_s"], "flops_per_token": ev["flops_per_token"],
                 "gflop_s": ev["gflop_s"], "utilisation": round(ev["gflop_s"] / peak, 3),
                 "utilisation_cpu": round(ev["tokens"] * ev["flops_per_token"] / ev["cpu_s"] / 1e9 / peak_cpu, 3),
                 "peak_rss_gib": ev["peak_rss_gib"]})
    print(f"\n{args.teacher.name}, batch {args.batch} x {args.seq}, {threads} thread(s); dense fp32 matmul "
          f"{mm_before['gflops']:.1f} GFLOP/s before, {mm_after['gflops']:.1f} after (load average {load_before:.1f})")
    print(f"(per CPU second of this process: matmul {peak_cpu:.1f} GFLOP/s; 'per CPU s' utilisation divides the "
          "FLOPs by the CPU seconds the run got, so it does not move with the load)")
    print("| stage | tokens/s | achieved GFLOP/s | utilisation | utilisation per CPU s | peak RSS GiB | "
          "planned RSS GiB (no guard) | planned tokens/s | wall s | planned wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['tokens_per_s']:.1f} | {r['gflop_s']:.1f} | {r['utilisation']:.2f} | "
              f"{r['utilisation_cpu'] if r['utilisation_cpu'] is not None else '-'} | "
              f"{r['peak_rss_gib'] or str(r.get('process_peak_rss_gib')) + ' (process)'} | "
              f"{r.get('planned_rss_gib_without_guard', '-')} | "
              f"{r.get('planned_tokens_per_s', '-')} | {r['wall_s']} | {r.get('planned_wall_s', '-')} |")
    wall = time.perf_counter() - t_start
    print(f"(benchmark wall time {wall / 60:.1f} min; the convert process's peak RSS "
          f"{conv['process_peak_rss_gib']} GiB; planned RSS without the stage guard's snapshot: --no-eval takes none)")
    result = {"label": args.label, "teacher": str(args.teacher), "data": str(args.data), "threads": threads,
              "batch": args.batch, "seq_len": args.seq, "micro1": args.micro1, "micro2": args.micro2,
              "old_code": args.old_code, "matmul_before": mm_before, "matmul_after": mm_after,
              "matmul_gflops": peak, "matmul_gflops_per_cpu_s": peak_cpu, "load_average_before": load_before,
              "load_average_after": os.getloadavg()[0],
              "rows": rows, "eval": ev, "plan": plan, "convert_wall_s": conv["wall_s"],
              "convert_peak_rss_gib": conv["process_peak_rss_gib"], "stages": conv["report"]["stages"],
              "benchmark_wall_s": round(wall, 1), "torch": torch.__version__, "cpu": platform.processor(),
              "cpus": os.cpu_count(), "command": " ".join(sys.argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"train_cost_{args.teacher.name}_{args.label}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
