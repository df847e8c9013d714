"""`qwerky plan`: per-stage memory and time of a conversion, from the teacher's config alone.

Parameter counts are exact (the teacher and student module trees are built on the meta device, so no
weights are read); memory and time are estimates: bf16 frozen weights, fp32 master weights + gradients
+ AdamW moments for what trains, all sharded by FSDP2 across the GPUs; activations with activation
checkpointing; time from FLOPs (2 per parameter per token forward, 4 backward) at an assumed MFU.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import torch

GiB = 1024**3


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher folder or its config.json")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the server")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GB")
    p.add_argument("--gpu-tflops", type=float, default=989.0, help="dense bf16 peak TFLOP/s per GPU (H100: 989)")
    p.add_argument("--mfu", type=float, default=0.35, help="assumed model-FLOPs utilisation")
    p.add_argument("--recipe", default="published", help="recipe whose budgets are planned")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field")
    p.add_argument("--json", help="also write the plan as JSON")


def _count(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def make_plan(config: Any, gpus: int, gpu_mem_gb: float, tflops: float, mfu: float, recipe: Any) -> dict[str, Any]:
    from qwerky.modeling.modeling_qwerky import QwerkyForCausalLM
    from qwerky.surgery.convert import student_config
    from qwerky.surgery.families import inspect_teacher
    from qwerky.teacher import teacher_skeleton

    teacher = teacher_skeleton(config)
    layout = inspect_teacher(teacher)
    scfg = student_config(teacher, layout, **recipe.student.convert_kwargs())
    with torch.device("meta"):
        student = QwerkyForCausalLM(scfg)
    p_teacher = _count(teacher)
    p_student = _count(student)
    p_mixers = sum(_count(m) for m in student.mixers)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    inter = getattr(config, "intermediate_size", 4 * hidden)
    vocab = config.vocab_size
    mem_budget = gpu_mem_gb * 1e9 / GiB
    stages = []
    for n in (1, 2, 3, 4):
        spec = recipe.stage(n)
        trainable = p_mixers if n in (1, 2) else p_student
        frozen_bytes = 2 * (p_teacher + (p_student - trainable))  # bf16 teacher + frozen student weights
        train_bytes = 16 * trainable  # fp32 weight + grad + two AdamW moments
        sharded = (frozen_bytes + train_bytes) / gpus
        micro = max(1, spec.micro_batch_size or max(1, spec.batch_size // gpus))
        tokens = micro * spec.seq_len
        act = tokens * hidden * 2 * layers * 2  # checkpointed layer inputs (teacher + student), bf16
        act += tokens * (8 * hidden + 3 * inter) * 2 * 2  # one layer recomputed, with its backward
        act += micro * min(spec.logits_chunk, spec.seq_len) * vocab * 4 * 3  # one KL chunk, fp32
        if n == 1:
            act = tokens * hidden * 2 * 3 * layers  # every layer's input/target/output kept
        total_gib = (sharded + act) / GiB + 2.0  # + CUDA context and allocator slack
        flops_per_token = {1: 2 * p_teacher + 6 * p_mixers,
                           2: 2 * p_teacher + 4 * p_student + 2 * p_mixers,
                           3: 2 * p_teacher + 6 * p_student,
                           4: (0 if spec.loss == "ce" else 2 * p_teacher) + 6 * p_student}[n]
        seconds = spec.tokens * flops_per_token / (gpus * tflops * 1e12 * mfu)
        stages.append({"stage": n, "tokens": spec.tokens, "seq_len": spec.seq_len, "trainable_params": trainable,
                       "memory_per_gpu_gib": round(total_gib, 1), "fits": total_gib <= mem_budget,
                       "hours": round(seconds / 3600, 2), "micro_batch_per_gpu": micro})
    head_dim, heads = scfg.head_dim, scfg.num_heads
    state_mib = layers * heads * head_dim * head_dim * 4 / 2**20
    kv_per_token = 2 * layers * scfg.num_kv_heads * head_dim * 2
    return {
        "teacher": {"model_type": config.model_type, "params": p_teacher, "layers": layers, "hidden": hidden,
                    "heads": heads, "kv_heads": scfg.num_kv_heads, "head_dim": head_dim, "vocab": vocab},
        "student": {"mixer": scfg.mixer, "params": p_student, "new_params": p_student - p_teacher,
                    "state_mib_per_sequence": round(state_mib, 1),
                    "teacher_kv_mib_at_4k": round(kv_per_token * 4096 / 2**20, 1),
                    "teacher_kv_mib_at_32k": round(kv_per_token * 32768 / 2**20, 1)},
        "gpus": gpus, "gpu_mem_gb": gpu_mem_gb, "stages": stages,
        "fits": all(s["fits"] for s in stages), "total_hours": round(sum(s["hours"] for s in stages), 2),
    }


def plan_main(args: argparse.Namespace) -> int:
    from qwerky.teacher import load_config
    from qwerky.train.recipe import load_recipe

    config = load_config(args.teacher)
    recipe = load_recipe(args.recipe, args.set or [])
    plan = make_plan(config, args.gpus, args.gpu_mem, args.gpu_tflops, args.mfu, recipe)
    t, s = plan["teacher"], plan["student"]
    print(f"teacher {t['model_type']}: {t['params'] / 1e9:.2f}B params, {t['layers']} layers, hidden {t['hidden']}, "
          f"{t['heads']}/{t['kv_heads']} heads x {t['head_dim']}")
    print(f"student {s['mixer']}: {s['params'] / 1e9:.2f}B params ({s['new_params'] / 1e6:.0f}M new); state "
          f"{s['state_mib_per_sequence']} MiB/sequence vs teacher KV {s['teacher_kv_mib_at_4k']} MiB at 4k, "
          f"{s['teacher_kv_mib_at_32k']} MiB at 32k")
    print(f"\n{args.gpus} x {args.gpu_mem:g} GB GPUs, {args.gpu_tflops:g} TFLOP/s at MFU {args.mfu:g} (estimates)")
    print("| stage | tokens | seq | trainable | mem/GPU GiB | fits | hours |")
    print("|---|---|---|---|---|---|---|")
    for st in plan["stages"]:
        print(f"| {st['stage']} | {st['tokens'] / 1e6:,.0f}M | {st['seq_len']} | {st['trainable_params'] / 1e9:.2f}B | "
              f"{st['memory_per_gpu_gib']} | {'yes' if st['fits'] else 'NO'} | {st['hours']} |")
    verdict = "fits" if plan["fits"] else "does NOT fit (lower micro_batch_size / seq_len, or add GPUs)"
    print(f"\ntotal ~{plan['total_hours']} h; {verdict}")
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(plan, indent=2))
    return 0 if math.isfinite(plan["total_hours"]) else 1
