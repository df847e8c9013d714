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
  the machine's RAM; the threads a run would use (train/loop.choose_threads); this CPU's dense fp32 matmul
  FLOP/s measured in a second (or `--cpu-gflops`); time = FLOPs / (matmul FLOP/s x utilisation), the
  utilisation measured by benchmarks/train_cost.py (`--utilisation`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

import torch

GiB = 1024**3
# Resident bytes per byte a stage allocates: glibc keeps freed heap pages of a step resident, the more so
# for short-lived buffers (one layer's forward and backward, the KL chunks) than for what lives through the
# step (optimiser state, kept activations, the teacher's records). With every allocation mmapped
# (MALLOC_MMAP_THRESHOLD_) stage 1 at 8 x 512 grew 1.64 GiB, as simulated, but ran 65% slower. The two
# factors are fitted to three SmolLM2-135M runs (docs/cost.md: stage 1 at 8 x 512, stage 2 at 2 x 512 and
# at 8 x 512 checkpointed), which they then match within 5%; they are not validated on other models.
RSS_OVERHEAD_KEPT = 1.15
RSS_OVERHEAD_TRANSIENT = 2.9
# Stages after the first also start with ~0.6 GiB the earlier ones left (1.70-1.74 GiB resident at stage
# 2's start for 1.12 of weights and runtime, after malloc_trim).
RETAINED_GIB = 0.6
RUNTIME_GIB = 0.5  # python + torch + transformers + tokenizer: 0.38 GiB after the imports, 0.47 at stage 1
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


def saved_bytes(fn: Any, params: Any = ()) -> int:
    """Bytes of the tensors autograd keeps for backward while `fn()` runs, each storage once, leaving out the
    storages of `params` (weights saved for an input gradient are not activations)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    own = {StorageWeakRef(p.untyped_storage()) for p in params}
    seen: dict[Any, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        ref = StorageWeakRef(s)
        if ref not in own:
            seen[ref] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


class _PeakLive:
    """Peak bytes of the tensors that ops create while `mode` is on and that are alive at once (each storage
    once; tensors made before are not counted). Works on fake tensors, so it simulates without memory."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                tracker.saw(out)
                return out

        self.mode = Mode()
        self.live: dict[Any, int] = {}
        self.peak = 0

    def saw(self, out: Any) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                self.live.setdefault(StorageWeakRef(st), st.nbytes())
        for ref in [r for r in self.live if r.expired()]:
            del self.live[ref]
        self.peak = max(self.peak, sum(self.live.values()))

    def now(self) -> int:
        for ref in [r for r in self.live if r.expired()]:
            del self.live[ref]
        return sum(self.live.values())


def layer_activations(student: torch.nn.Module, micro: int, T: int, teacher: torch.nn.Module | None = None,
                      logits_chunk: int = 128) -> dict[str, int]:
    """What one step needs beside the weights, simulated on fake tensors (no memory, no compute) at
    [micro, T]; `student` and `teacher` are meta-device skeletons (modified: pass fresh ones). Bytes:

    - "layer": kept for backward by one converted decoder layer, its input needing grad (stages 2-4);
      "layer_peak": that layer's forward + backward at its highest (saved + backward's buffers);
    - "mixer": kept by the mixer alone on an input without grad (stage 1); "mixer_peak" with its backward;
    - "teacher_layer_peak": one teacher decoder layer's forward without grad at its highest;
    - "kl_peak" / "kl_peak_head": the chunked KL of `logits_chunk` positions, its gradient computed in the
      forward (train/losses.py), head frozen / trained."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from qwerky.modeling.mixer_attention import AttentionMixer
    from qwerky.modeling.modeling_qwerky import find_decoder_layers
    from qwerky.train.losses import chunked_kl

    cfg = student.config
    converted = [i for i, m in enumerate(student.mixers) if not isinstance(m, AttentionMixer)]
    out = dict.fromkeys(("layer", "layer_peak", "mixer", "mixer_peak", "teacher_layer_peak", "kl_peak",
                         "kl_peak_head"), 0)
    i = converted[1] if len(converted) > 1 else (converted[0] if converted else 0)  # reads the value residual
    layer = find_decoder_layers(student.model, cfg.num_hidden_layers)[i]
    mixer = student.mixers[i]
    C = cfg.hidden_size
    dtype = next(layer.parameters()).dtype

    def peak(fn: Any) -> int:
        tracker = _PeakLive()
        with tracker.mode:
            fn()
        return tracker.peak

    with FakeTensorMode(allow_non_fake_inputs=True):
        layer.to_empty(device="cpu")
        rotary = student.model.rotary_emb.to_empty(device="cpu")
        x = torch.empty(micro, T, C, dtype=dtype)
        rope = rotary(x, torch.arange(T).expand(micro, T))
        student.ctx.v_first = torch.empty(micro, T, cfg.num_heads, cfg.head_dim, dtype=dtype, requires_grad=True)
        layer.requires_grad_(False)
        params = list(layer.parameters())
        if converted:
            mixer.requires_grad_(True)
            out["mixer"] = saved_bytes(lambda: mixer(x, position_embeddings=rope), params)
            out["mixer_peak"] = peak(lambda: mixer(x, position_embeddings=rope)[0].sum().backward())
        xg = torch.empty(micro, T, C, dtype=dtype, requires_grad=True)
        out["layer"] = saved_bytes(lambda: layer(xg, position_embeddings=rope, attention_mask=None), params)
        out["layer_peak"] = peak(lambda: layer(xg, position_embeddings=rope, attention_mask=None).sum().backward())
        student.ctx.v_first = None
        head = student.lm_head.to_empty(device="cpu")
        hidden = torch.empty(micro, T, C, dtype=dtype, requires_grad=True)
        t_hidden = torch.empty(micro, T, C, dtype=dtype)
        for key, trains in (("kl_peak", False), ("kl_peak_head", True)):
            head.requires_grad_(trains)
            hp = [head.weight] if trains else []
            out[key] = peak(lambda hp=hp: chunked_kl(hidden, t_hidden, head, head, logits_chunk, head_params=hp
                                                     ).backward())
        if teacher is not None:
            from qwerky.modeling.modeling_qwerky import find_decoder_layers as layers_of

            base = getattr(teacher, teacher.base_model_prefix)
            t_layer = layers_of(base, teacher.config.num_hidden_layers)[0].to_empty(device="cpu")
            t_rot = base.rotary_emb.to_empty(device="cpu")
            t_rope = t_rot(x, torch.arange(T).expand(micro, T))
            with torch.no_grad():
                out["teacher_layer_peak"] = peak(lambda: t_layer(x, position_embeddings=t_rope, attention_mask=None))
    return out


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


def cpu_activation_bytes(stage: int, spec: Any, acts: dict[str, int], layers: int, converted: int, hidden: int,
                         checkpointing: bool) -> dict[str, float]:
    """A CPU stage's memory beside the weights at its micro-batch (fp32), by part; `acts`: `layer_activations`.

    Stage 1 (stages.Stage1.step): the teacher's records (each converted layer's attention input and output)
    stay for the step; then either the teacher's forward (one layer at a time) or the mixers (the
    value-residual source's graph waits; one other mixer's forward and backward). Stages 2-4: every layer's
    kept activations (or, checkpointed, every layer's input and one layer recomputed), then the teacher's
    forward, the KL chunk by chunk, or the backward through one layer, at their highest."""
    act = 4 * spec_micro(spec) * spec.seq_len * hidden  # one [micro, T, hidden] fp32 tensor
    if stage == 1:
        return {"teacher_records": 2 * converted * act,
                "transient": max(acts["teacher_layer_peak"], acts["mixer"] + acts["mixer_peak"])}
    kept = layers * act if checkpointing else layers * acts["layer"]
    layer_extra = acts["layer_peak"] if checkpointing else acts["layer_peak"] - acts["layer"]
    kl = acts["kl_peak_head"] if stage >= 3 else acts["kl_peak"]
    # the student's final hidden states stay through the teacher's forward (its stream beside one layer) and
    # the KL (the teacher's final hidden states beside it)
    return {"layers": kept, "transient": act + max(acts["teacher_layer_peak"] + act, kl + act, layer_extra)}


def spec_micro(spec: Any, ranks: int = 1) -> int:
    return max(1, spec.micro_batch_size or max(1, spec.batch_size // ranks))


def auto_checkpointing(stage: int, spec: Any, acts: dict[str, int], layers: int, ram_bytes: float) -> bool:
    """train.activation_checkpointing=auto on a CPU: checkpoint stage 2-4 layers when keeping every layer's
    activations would take more than a quarter of the machine's memory (recomputing costs about a quarter
    more time: SmolLM2-135M stage 2, 22.2 s vs 18.3 s CPU per 2 x 512 tokens; memory 2.7 vs 6.2 GiB)."""
    return stage > 1 and layers * acts["layer"] * RSS_OVERHEAD_KEPT > ram_bytes / 4


def stage_needs_checkpointing(student_config: Any, stage: int, spec: Any, ram_bytes: float | None = None
                              ) -> tuple[bool, str]:
    """The `auto` decision for one CPU stage of a student with this config, and a line saying why."""
    from qwerky.modeling.modeling_qwerky import QwerkyForCausalLM

    if stage == 1:
        return False, "stage 1 bounds its memory per mixer"
    ram = ram_bytes or machine_ram_bytes()
    with torch.device("meta"):
        skeleton = QwerkyForCausalLM(student_config)
    acts = layer_activations(skeleton, spec_micro(spec), spec.seq_len)
    layers = student_config.num_hidden_layers
    need = layers * acts["layer"] * RSS_OVERHEAD_KEPT
    on = auto_checkpointing(stage, spec, acts, layers, ram)
    return on, (f"every layer's activations at {spec_micro(spec)} x {spec.seq_len} tokens would take "
                f"{need / GiB:.1f} GiB, {'over' if on else 'under'} a quarter of this machine's "
                f"{ram / GiB:.0f} GiB")


def machine_ram_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * GiB


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
    cpu = None
    if gpus == 0:
        from qwerky.train.loop import choose_threads

        threads, why = choose_threads(args.threads or recipe.train.threads)
        measured = args.cpu_gflops is None
        gflops = measure_cpu_gflops(threads) if measured else args.cpu_gflops
        ram = args.ram * 1e9 if args.ram else machine_ram_bytes()
        cpu = {"ram_bytes": ram, "gflops": round(gflops, 1), "gflops_source": "measured" if measured else "given",
               "threads": threads, "threads_reason": why, "utilisation": args.utilisation,
               "checkpointing": recipe.train.activation_checkpointing}
        mem = 0.0
    else:
        mem = args.gpu_mem or (torch.cuda.get_device_properties(0).total_memory / 1e9
                               if torch.cuda.is_available() and args.gpus is None else 80.0)
    plan = make_plan(config, gpus, mem, args.gpu_tflops, args.mfu, recipe, cpu=cpu)
    t, s = plan["teacher"], plan["student"]
    if assumed:
        print(f"({assumed})")
    print(f"teacher {t['model_type']}: {human(t['params'])} params, {t['layers']} layers, hidden {t['hidden']}, "
          f"{t['heads']}/{t['kv_heads']} heads x {t['head_dim']}")
    print(f"student {s['mixer']}: {human(s['params'])} params ({human(s['new_params'])} new); state "
          f"{s['state_mib_per_sequence']} MiB/sequence vs teacher KV {s['teacher_kv_mib_at_4k']} MiB at 4k, "
          f"{s['teacher_kv_mib_at_32k']} MiB at 32k")
    print(f"recipe {plan['recipe']}")
    if cpu is None:
        print(f"\n{gpus} x {mem:g} GB GPUs, {args.gpu_tflops:g} TFLOP/s at MFU {args.mfu:g} (estimates)")
        print("| stage | tokens | seq | micro/GPU | trainable | mem/GPU GiB | fits | time |")
        print("|---|---|---|---|---|---|---|---|")
        for st in plan["stages"]:
            print(f"| {st['stage']} | {human(st['tokens'])} | {st['seq_len']} | {st['micro_batch']} | "
                  f"{human(st['trainable_params'])} | {st['memory_per_gpu_gib']} | {'yes' if st['fits'] else 'NO'} | "
                  f"{human_hours(st['hours'])} |")
    else:
        c = plan["cpu"]
        print(f"\nthis CPU: {c['threads']} thread(s) ({c['threads_reason']}); {plan['ram_gb']:g} GB RAM; "
              f"dense fp32 matmul {c['gflops']:g} GFLOP/s ({c['gflops_source']}); one process, fp32 (estimates)")
        print("| stage | tokens | seq | micro | trainable | GFLOP/token | checkpointing | peak RSS GiB | fits | "
              "tokens/s | time |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for st in plan["stages"]:
            print(f"| {st['stage']} | {human(st['tokens'])} | {st['seq_len']} | {st['micro_batch']} | "
                  f"{human(st['trainable_params'])} | {st['flops_per_token'] / 1e9:.3g} | "
                  f"{'layers' if st['activation_checkpointing'] else ('per mixer' if st['stage'] == 1 else 'off')} | "
                  f"{st['memory_gib']} | {'yes' if st['fits'] else 'NO'} | {st['tokens_per_s']:g} | "
                  f"{human_hours(st['hours'])} |")
        utils = ", ".join(f"{st['utilisation']:g}" for st in plan["stages"])
        print(f"(time: FLOPs / (matmul FLOP/s x utilisation {utils}, measured by benchmarks/train_cost.py); "
              "memory: fp32 weights, AdamW, the stage guard's snapshot, activations measured on fake tensors)")
    verdict = "fits" if plan["fits"] else "does NOT fit (lower micro_batch_size / seq_len, or add memory)"
    print(f"\ntotal ~{human_hours(plan['total_hours'])}; {verdict}")
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(plan, indent=2))
    return 0 if math.isfinite(plan["total_hours"]) else 1
