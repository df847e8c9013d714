"""`qwerky plan`: per-stage memory and time of a conversion, from the teacher's config alone.

Parameter counts are exact (the teacher and student module trees are built on the meta device, so no
weights are read). FLOPs per token are counted analytically (train/flops.py). Activation memory is measured,
not guessed: one student decoder layer runs forward on fake tensors (no memory, no compute) at the stage's
micro-batch and length, and the tensors autograd keeps for backward are added up.

Two machines:

* GPUs (`--gpus N`, or none given on a machine that has CUDA GPUs): bf16 frozen weights, fp32 master
  weights + gradients + AdamW moments for what trains, all sharded by FSDP2 across the GPUs; activations
  with activation checkpointing; time from FLOPs at an assumed MFU.
* This CPU (`--cpu` / `--gpus 0`, or no --gpus on a machine without GPUs): fp32 everywhere, one process;
  the machine's RAM; the threads a run would use (qwerky/threads.py); this CPU's dense fp32 matmul
  FLOP/s measured in a second (or `--cpu-gflops`); time = FLOPs / (matmul FLOP/s x utilisation), the
  utilisation measured by benchmarks/train_cost.py (`--utilisation`).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import torch

from qwerky.train.memory import (
    RETAINED_GIB,
    RSS_OVERHEAD_KEPT,
    RSS_OVERHEAD_TRANSIENT,
    RUNTIME_GIB,
    GiB,
    auto_checkpointing,
    cpu_activation_bytes,
    layer_activations,
    machine_ram_bytes,
    spec_micro,
)

# Achieved / matmul FLOP/s of the CPU stages per CPU second, measured by benchmarks/train_cost.py on
# SmolLM2-135M (2-core AMD EPYC, 1 thread): see docs/cost.md. Used for time unless --utilisation is given;
# on a shared machine the wall-clock rate is lower by the share of the core the run gets.
CPU_UTILISATION = {1: 0.6, 2: 0.6, 3: 0.6, 4: 0.6}  # 1, 2 measured (0.61, 0.61 per CPU second); 3, 4 assumed


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher folder or its config.json")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs in the server; 0 plans this CPU (default: this machine's GPUs, or its CPU if none)")
    p.add_argument("--cpu", action="store_true", help="plan a run on this machine's CPU (same as --gpus 0)")
    p.add_argument("--gpu-mem", type=float, default=None, help="memory per GPU in GB (default: 80, or this GPU's)")
    p.add_argument("--gpu-tflops", type=float, default=989.0, help="dense bf16 peak TFLOP/s per GPU (H100: 989)")
    p.add_argument("--mfu", type=float, default=0.35, help="assumed model-FLOPs utilisation (GPUs)")
    p.add_argument("--ram", type=float, default=None, help="CPU: memory in GB (default: this machine's)")
    p.add_argument("--cpu-gflops", type=float, default=None,
                   help="CPU: dense fp32 matmul GFLOP/s (default: measured now, at the run's thread count)")
    p.add_argument("--threads", type=int, default=0, help="CPU: threads (default: what a run would choose)")
    p.add_argument("--utilisation", type=float, default=None,
                   help="CPU: achieved / matmul FLOP/s of training (default: measured per stage, docs/cost.md)")
    p.add_argument("--recipe", default=None, help="recipe whose budgets are planned (default: published on "
                                                  "GPUs, default on a CPU)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field")
    p.add_argument("--json", help="also write the plan as JSON")


def _count(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def human(n: float) -> str:
    """A count for people: 400000 -> 400k, 1650000 -> 1.65M, 72.7e9 -> 72.7B, 512 -> 512."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}" if isinstance(n, float) and not float(n).is_integer() else str(int(n))


def human_hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    if h < 1:
        return f"{h * 60:.0f} min"
    return f"{h:.1f} h"


def _skeletons(config: Any, recipe: Any) -> tuple[torch.nn.Module, Any, Any]:
    from qwerky.modeling.modeling_qwerky import QwerkyForCausalLM
    from qwerky.surgery.convert import student_config
    from qwerky.surgery.families import inspect_teacher
    from qwerky.teacher import teacher_skeleton

    teacher = teacher_skeleton(config)
    scfg = student_config(teacher, inspect_teacher(teacher), **recipe.student.convert_kwargs())
    with torch.device("meta"):
        student = QwerkyForCausalLM(scfg)
    return teacher, student, scfg


def make_plan(config: Any, gpus: int, gpu_mem_gb: float, tflops: float, mfu: float, recipe: Any,
              cpu: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plan. `cpu` (ram_bytes, gflops, threads, utilisation) plans a single-process CPU run instead of
    `gpus` GPUs."""
    from qwerky.train.flops import FlopModel

    teacher, student, scfg = _skeletons(config, recipe)
    flops = FlopModel.from_models(teacher, student)
    p_teacher = _count(teacher)
    p_student = _count(student)
    p_mixers = sum(_count(m) for m, c in zip(student.mixers, flops.converted) if c)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    vocab = config.vocab_size
    stages = []
    for n in (1, 2, 3, 4):
        spec = recipe.stage(n)
        trainable = p_mixers if n in (1, 2) else p_student
        lora = n >= 3 and spec.lora_rank > 0
        if cpu is None:
            frozen_bytes = 2 * (p_teacher + (p_student - trainable))  # bf16 teacher + frozen student weights
            train_bytes = 16 * trainable  # fp32 weight + grad + two AdamW moments
            sharded = (frozen_bytes + train_bytes) / gpus
            micro = spec_micro(spec, gpus)
            tokens = micro * spec.seq_len
            act = tokens * hidden * 2 * layers * 2  # checkpointed layer inputs (teacher + student), bf16
            act += tokens * (8 * hidden + 3 * inter) * 2 * 2  # one layer recomputed, with its backward
            act += micro * min(spec.logits_chunk, spec.seq_len) * vocab * 4 * 3  # one KL chunk, fp32
            if n == 1:
                act = tokens * hidden * 2 * 3 * layers  # every layer's input/target/output kept
            total_gib = (sharded + act) / GiB + 2.0  # + CUDA context and allocator slack
            budget = gpu_mem_gb * 1e9 / GiB
            per_token = flops.step_flops(n, spec.seq_len, spec.loss, lora=lora, recompute_layers=n > 1,
                                         recompute_head=True, recompute_mixers=n == 1,
                                         stage1_student_forward=True)["total"]
            seconds = spec.tokens * per_token / (gpus * tflops * 1e12 * mfu)
            entry = {"memory_per_gpu_gib": round(total_gib, 1)}
        else:
            micro = spec_micro(spec)
            t_fresh, s_fresh, _ = _skeletons(config, recipe)
            acts = layer_activations(s_fresh, micro, spec.seq_len, teacher=t_fresh, logits_chunk=spec.logits_chunk)
            ckpt = cpu.get("checkpointing", "auto")
            checkpointing = ckpt == "on" or (ckpt == "auto" and auto_checkpointing(n, spec, acts, layers,
                                                                                  cpu["ram_bytes"]))
            parts = cpu_activation_bytes(n, spec, acts, layers, sum(flops.converted), hidden, checkpointing)
            own = 4 * (p_mixers if n in (1, 2) else p_student)  # the student's own copies (the rest is shared)
            weights = 4 * p_teacher + own  # fp32 teacher and the student's copies, resident before the stage
            optimizer = 12 * trainable  # fp32 gradients + AdamW moments, made by the stage
            guard = 4 * p_student  # the stage guard's snapshot of the student, held during the stage
            kept = optimizer + sum(v for k, v in parts.items() if k != "transient")
            grown = kept + parts["transient"]
            allocator = (RSS_OVERHEAD_KEPT - 1) * kept + (RSS_OVERHEAD_TRANSIENT - 1) * parts["transient"]
            retained = RETAINED_GIB if n > 1 else 0.0  # what the earlier stages left resident
            total_gib = (weights + guard + grown + allocator) / GiB + RUNTIME_GIB + retained
            budget = cpu["ram_bytes"] / GiB
            per_token = flops.step_flops(n, spec.seq_len, spec.loss, lora=lora, recompute_layers=checkpointing,
                                         recompute_head=spec.loss == "ce")["total"]
            util = cpu["utilisation"] or CPU_UTILISATION[n]
            seconds = spec.tokens * per_token / (cpu["gflops"] * 1e9 * util)
            entry = {"memory_gib": round(total_gib, 2), "activation_checkpointing": checkpointing,
                     "memory_parts_gib": {"runtime": RUNTIME_GIB, "retained": retained,
                                          "weights": round(weights / GiB, 2),
                                          "optimizer": round(optimizer / GiB, 2),
                                          "allocator": round(allocator / GiB, 2),
                                          "guard_snapshot": round(guard / GiB, 2),
                                          **{k: round(v / GiB, 2) for k, v in parts.items()}},
                     "utilisation": util, "tokens_per_s": round(cpu["gflops"] * 1e9 * util / per_token, 1)}
        stages.append({"stage": n, "tokens": spec.tokens, "seq_len": spec.seq_len, "trainable_params": trainable,
                       "fits": total_gib <= budget, "hours": round(seconds / 3600, 3), "seconds": round(seconds, 1),
                       "micro_batch": micro,
                       "flops_per_token": round(per_token), **entry})
    head_dim, heads = scfg.head_dim, scfg.num_heads
    state_mib = layers * heads * head_dim * head_dim * 4 / 2**20
    kv_per_token = 2 * layers * scfg.num_kv_heads * head_dim * 2
    plan = {
        "teacher": {"model_type": config.model_type, "params": p_teacher, "layers": layers, "hidden": hidden,
                    "heads": heads, "kv_heads": scfg.num_kv_heads, "head_dim": head_dim, "vocab": vocab},
        "student": {"mixer": scfg.mixer, "params": p_student, "new_params": p_student - p_teacher,
                    "state_mib_per_sequence": round(state_mib, 1),
                    "teacher_kv_mib_at_4k": round(kv_per_token * 4096 / 2**20, 1),
                    "teacher_kv_mib_at_32k": round(kv_per_token * 32768 / 2**20, 1)},
        "recipe": recipe.name, "stages": stages,
        "fits": all(s["fits"] for s in stages), "total_hours": round(sum(s["hours"] for s in stages), 3),
    }
    if cpu is None:
        plan.update(machine="gpu", gpus=gpus, gpu_mem_gb=gpu_mem_gb)
    else:
        plan.update(machine="cpu", cpu={k: v for k, v in cpu.items() if k != "ram_bytes"},
                    ram_gb=round(cpu["ram_bytes"] / 1e9, 1))
    return plan


def measure_cpu_gflops(threads: int, seconds: float = 1.0) -> float:
    """This CPU's dense fp32 matmul GFLOP/s at `threads` threads (median of 1024^3 and 2048^3 products)."""
    from qwerky.train.flops import matmul_gflops

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return matmul_gflops(sizes=(1024, 2048), repeats=3, budget_s=seconds)
    finally:
        torch.set_num_threads(old)


def plan_main(args: argparse.Namespace) -> int:
    from qwerky.teacher import load_config
    from qwerky.train.recipe import load_recipe

    config = load_config(args.teacher)
    gpus = 0 if args.cpu else args.gpus
    assumed = ""
    if gpus is None:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        assumed = (f"no --gpus given: planning for this machine's {gpus} GPU(s)" if gpus else
                   "no --gpus given and no GPU here: planning for this CPU (pass --gpus N to plan a GPU server)")
    recipe = load_recipe(args.recipe or ("published" if gpus else "default"), args.set or [])
    cpu = _this_cpu(args, recipe) if gpus == 0 else None
    mem = 0.0 if cpu else (args.gpu_mem or (torch.cuda.get_device_properties(0).total_memory / 1e9
                                            if torch.cuda.is_available() and args.gpus is None else 80.0))
    plan = make_plan(config, gpus, mem, args.gpu_tflops, args.mfu, recipe, cpu=cpu)
    print("\n".join(([f"({assumed})"] if assumed else []) + render_plan(plan, gpus, mem, args)))
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(plan, indent=2))
    return 0 if math.isfinite(plan["total_hours"]) else 1


def _this_cpu(args: argparse.Namespace, recipe: Any) -> dict[str, Any]:
    """This machine as a CPU plan sees it: threads a run would use, RAM, measured (or given) matmul rate."""
    from qwerky.threads import choose_threads

    threads, why = choose_threads(args.threads or recipe.train.threads)
    measured = args.cpu_gflops is None
    gflops = measure_cpu_gflops(threads) if measured else args.cpu_gflops
    return {"ram_bytes": args.ram * 1e9 if args.ram else machine_ram_bytes(), "gflops": round(gflops, 1),
            "gflops_source": "measured" if measured else "given", "threads": threads, "threads_reason": why,
            "utilisation": args.utilisation, "checkpointing": recipe.train.activation_checkpointing}


def render_plan(plan: dict[str, Any], gpus: int, mem: float, args: argparse.Namespace) -> list[str]:
    """The plan as the lines `qwerky plan` prints: teacher, student, one table row per stage, the total."""
    t, s = plan["teacher"], plan["student"]
    lines = [f"teacher {t['model_type']}: {human(t['params'])} params, {t['layers']} layers, hidden {t['hidden']}, "
             f"{t['heads']}/{t['kv_heads']} heads x {t['head_dim']}",
             f"student {s['mixer']}: {human(s['params'])} params ({human(s['new_params'])} new); state "
             f"{s['state_mib_per_sequence']} MiB/sequence vs teacher KV {s['teacher_kv_mib_at_4k']} MiB at 4k, "
             f"{s['teacher_kv_mib_at_32k']} MiB at 32k",
             f"recipe {plan['recipe']}"]
    if plan.get("cpu") is None:
        lines += [f"\n{gpus} x {mem:g} GB GPUs, {args.gpu_tflops:g} TFLOP/s at MFU {args.mfu:g} (estimates)",
                  "| stage | tokens | seq | micro/GPU | trainable | mem/GPU GiB | fits | time |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {st['stage']} | {human(st['tokens'])} | {st['seq_len']} | {st['micro_batch']} | "
                  f"{human(st['trainable_params'])} | {st['memory_per_gpu_gib']} | {'yes' if st['fits'] else 'NO'} | "
                  f"{human_hours(st['hours'])} |" for st in plan["stages"]]
    else:
        c = plan["cpu"]
        lines += [f"\nthis CPU: {c['threads']} thread(s) ({c['threads_reason']}); {plan['ram_gb']:g} GB RAM; "
                  f"dense fp32 matmul {c['gflops']:g} GFLOP/s ({c['gflops_source']}); one process, fp32 (estimates)",
                  "| stage | tokens | seq | micro | trainable | GFLOP/token | checkpointing | peak RSS GiB | fits | "
                  "tokens/s | time |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for st in plan["stages"]:
            how = "layers" if st["activation_checkpointing"] else ("per mixer" if st["stage"] == 1 else "off")
            lines.append(f"| {st['stage']} | {human(st['tokens'])} | {st['seq_len']} | {st['micro_batch']} | "
                         f"{human(st['trainable_params'])} | {st['flops_per_token'] / 1e9:.3g} | {how} | "
                         f"{st['memory_gib']} | {'yes' if st['fits'] else 'NO'} | {st['tokens_per_s']:g} | "
                         f"{human_hours(st['hours'])} |")
        utils = ", ".join(f"{st['utilisation']:g}" for st in plan["stages"])
        lines.append(f"(time: FLOPs / (matmul FLOP/s x utilisation {utils}, measured by benchmarks/train_cost.py); "
                     "memory: fp32 weights, AdamW, the stage guard's snapshot, activations measured on fake tensors)")
    verdict = "fits" if plan["fits"] else "does NOT fit (lower micro_batch_size / seq_len, or add memory)"
    lines.append(f"\ntotal ~{human_hours(plan['total_hours'])}; {verdict}")
    return lines
