"""Speed of every registered op (`qwerky.opspecs`) against causal softmax attention (SDPA) in the same run.

    python benchmarks/kernel_speed.py                        # CPU, 1 thread, fp32: PyTorch forms vs SDPA
    python benchmarks/kernel_speed.py --quick                # tiny sizes, seconds (tests/kernels runs this)
    python benchmarks/kernel_speed.py --ops rwkv7 --lengths 1024 4096 --naive --repeats 5
    python benchmarks/kernel_speed.py --device cuda --autotune-configs 1 --json $OUT/kernel_speed.json  # + fla

Three passes per length, every op and SDPA timed in turns in one group (A B C A B C ...), so that load from
other processes falls on all alike and the ratio to SDPA is fair:
- train: forward + backward to every input (`autograd.grad` of a fixed random output gradient);
- prefill: forward without grad;
- decode: one token from a [B, H, K, V] fp32 state (the op's step form, fla's recurrent kernel) against SDPA
  of one query over a `--cache-len`-token KV cache.
Methods: `sdpa` (the baseline of every ratio), `<op>_chunk` (the chunked PyTorch form; on CUDA only up to
`--torch-max-t`, it is slow), `<op>_fla` (fla's kernels through the op's dispatch: CUDA with
flash-linear-attention only), `<op>_naive` (per-token loop, smallest T, with `--naive`). The first calls warm
up (fla compiles and autotunes then: their seconds are reported as warm-up). Correctness is not checked here:
`pytest tests/kernels` (and `pytest -m cuda tests/kernels` on a GPU) does that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from qwerky.opspecs import OpSpec, all_op_specs, limit_triton_autotune  # noqa: E402

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "kernel_speed.json"
# (B, H, D, lengths, decode batch, KV cache length, warm-up, repeats)
SIZES = {"cpu": (1, 8, 64, [512, 2048, 8192], 8, 2048, 1, 3),
         "cuda": (1, 32, 128, [2048, 8192, 16384], 64, 8192, 2, 5),  # 7B-like heads
         "quick": (1, 2, 32, [64, 256], 2, 256, 1, 2)}

Fn = Callable[[], Any]


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def time_in_turns(methods: dict[str, Fn], warmup: int, repeats: int, cuda: bool
                  ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Warm every method up, then time them in turns; ({name: timings in ms}, {name: error of a failed one})."""
    failed: dict[str, str] = {}
    warm: dict[str, float] = {}
    for name, fn in methods.items():
        t0 = time.perf_counter()
        try:
            for _ in range(max(1, warmup)):
                fn()
            sync(cuda)
        except Exception as e:  # noqa: BLE001 - one failing method must not stop the others
            failed[name] = f"{type(e).__name__}: {e}"[:300]
            traceback.print_exc()
        warm[name] = time.perf_counter() - t0
    live = {n: f for n, f in methods.items() if n not in failed}
    times: dict[str, list[float]] = {n: [] for n in live}
    for _ in range(repeats):
        for name, fn in live.items():
            sync(cuda)
            t0 = time.perf_counter()
            fn()
            sync(cuda)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return ({n: {"median_ms": statistics.median(ts), "min_ms": min(ts), "times_ms": ts, "warmup_s": warm[n]}
             for n, ts in times.items()}, failed)


def sdpa_context(cuda: bool) -> tuple[Callable[[], Any], str]:
    """SDPA's flash backend where this torch selects it and it runs; otherwise torch's own choice."""
    if not cuda:
        return contextlib.nullcontext, "default (CPU)"
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q = torch.randn(1, 2, 16, 64, device="cuda", dtype=torch.bfloat16)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return (lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])), "flash"
    except Exception as e:  # noqa: BLE001
        return contextlib.nullcontext, f"default (flash unavailable: {type(e).__name__})"


def leaves(spec: OpSpec, B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str, state: bool
           ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The op's inputs in `dtype` as leaves, and its fp32 initial state (when `state`)."""
    x = spec.make_inputs(B, T, H, D, D, seed=T, state=state, device=device)
    args = [x[n].detach().to(dtype).requires_grad_(True) for n in spec.tensor_names]
    return args, (x["s0"].detach() if state else None)


def train_and_prefill(spec: OpSpec, form: str, args: list[torch.Tensor], go: torch.Tensor, scale: float
                      ) -> tuple[Fn, Fn]:
    """(forward + backward, forward without grad) of one form of the op."""
    def forward() -> torch.Tensor:
        if form == "fla":
            return spec.dispatch(*args, scale=scale, output_final_state=False, backend="fla")[0]
        return getattr(spec, form)(*args, scale=scale, output_final_state=False)[0]

    def train() -> None:
        torch.autograd.grad(forward(), args, go)

    def prefill() -> None:
        with torch.no_grad():
            forward()

    return train, prefill


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a CPU run takes seconds")
    p.add_argument("--ops", nargs="+", default=None, help="op names (default: every registered op)")
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--decode-batch", type=int, default=None)
    p.add_argument("--cache-len", type=int, default=None, help="SDPA decode: tokens in the KV cache")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="inputs (default bfloat16 on CUDA, float32 on CPU); states are fp32 throughout")
    p.add_argument("--torch-max-t", type=int, default=None,
                   help="longest T for the chunked PyTorch form (default 2048 on CUDA, no limit on CPU)")
    p.add_argument("--naive", action="store_true", help="also time the per-token loop at the smallest T")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default 1 on CPU)")
    p.add_argument("--autotune-configs", type=int, default=None,
                   help="keep the first N configs of each Triton autotune (faster compile, slower fla kernels)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results")
    args = p.parse_args(argv)

    cuda = args.device.startswith("cuda")
    if args.autotune_configs:
        limit_triton_autotune(args.autotune_configs)  # before fla imports
    B, H, D, lengths, dB, cache_len, warmup, repeats = SIZES["quick" if args.quick else "cuda" if cuda else "cpu"]
    B, H, D, dB = args.batch or B, args.heads or H, args.head_dim or D, args.decode_batch or dB
    lengths, cache_len = args.lengths or lengths, args.cache_len or cache_len
    warmup = warmup if args.warmup is None else args.warmup
    repeats = args.repeats or repeats
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    torch_max_t = args.torch_max_t or (2048 if cuda and not args.quick else max(lengths))
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    specs = [s for s in all_op_specs() if args.ops is None or s.name in args.ops]
    if not specs:
        raise SystemExit(f"no op named {args.ops}; registered: {[s.name for s in all_op_specs()]}")
    no_fla = {s.name: ("not on CUDA" if not cuda else None if s.module.fla_available() else "fla not importable")
              for s in specs}
    sdpa_ctx, sdpa_kind = sdpa_context(cuda)
    scale = D**-0.5
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=args.device, dtype=dtype)

    rows: list[dict[str, Any]] = []
    skipped = {f"{name}_fla": reason for name, reason in no_fla.items() if reason}
    failed: dict[str, str] = {}

    def record(pass_: str, T: int, methods: dict[str, Fn], reps: int) -> None:
        timings, errs = time_in_turns(methods, warmup, reps, cuda)
        failed.update({f"{pass_} T={T} {n}": e for n, e in errs.items()})
        base = timings.get("sdpa", {}).get("median_ms")
        for name, t in timings.items():
            rows.append({"pass": pass_, "T": T, "method": name, **t,
                         "ratio_to_sdpa": t["median_ms"] / base if base else None})
            ratio = f"{t['median_ms'] / base:.2f}" if base else "-"
            print(f"| {pass_} | {T} | {name} | {t['median_ms']:.3f} | {t['min_ms']:.3f} | {ratio} | "
                  f"{t['warmup_s']:.2f} |", flush=True)

    print(f"device={args.device} dtype={dtype} threads={torch.get_num_threads()} B={B} H={H} D={D} "
          f"ops={[s.name for s in specs]} sdpa={sdpa_kind}; median of {repeats} after {warmup} warm-up; "
          f"fla: {no_fla}\n")
    print("| pass | T | method | median ms | min ms | x SDPA | warm-up s |\n|---|---|---|---|---|---|---|")
    for T in lengths:
        qkv = [rnd(B, H, T, D).requires_grad_(True) for _ in range(3)]
        go_sdpa = rnd(B, H, T, D)

        def sdpa(qkv: list[torch.Tensor] = qkv) -> torch.Tensor:
            with sdpa_ctx():
                return F.scaled_dot_product_attention(*qkv, is_causal=True)

        def sdpa_train(qkv: list[torch.Tensor] = qkv, go: torch.Tensor = go_sdpa) -> None:
            torch.autograd.grad(sdpa(qkv), qkv, go)

        def sdpa_prefill(qkv: list[torch.Tensor] = qkv) -> None:
            with torch.no_grad():
                sdpa(qkv)

        train: dict[str, Fn] = {"sdpa": sdpa_train}
        prefill: dict[str, Fn] = {"sdpa": sdpa_prefill}
        go = rnd(B, T, H, D)
        for spec in specs:
            op_args, _ = leaves(spec, B, T, H, D, dtype, args.device, state=False)
            forms = ["chunk"] if T <= torch_max_t else []
            forms += [] if no_fla[spec.name] else ["fla"]
            forms += ["naive"] if args.naive and T == min(lengths) else []
            for form in forms:
                train[f"{spec.name}_{form}"], prefill[f"{spec.name}_{form}"] = train_and_prefill(
                    spec, form, op_args, go, scale)
        record("train", T, train, repeats)
        record("prefill", T, prefill, repeats)
        del train, prefill, qkv, go

    q, kv = rnd(dB, H, 1, D), [rnd(dB, H, cache_len, D) for _ in range(2)]

    def sdpa_decode() -> None:
        with torch.no_grad(), sdpa_ctx():
            F.scaled_dot_product_attention(q, *kv)

    decode: dict[str, Fn] = {"sdpa": sdpa_decode}
    memory_mib = {"sdpa_kv_cache": 2 * dB * H * cache_len * D * dtype.itemsize / 2**20}
    for spec in specs:
        op_args, s0 = leaves(spec, dB, 1, H, D, dtype, args.device, state=True)
        assert s0 is not None
        memory_mib[f"{spec.name}_state"] = s0.numel() * s0.element_size() / 2**20

        def step(spec: OpSpec = spec, a: list[torch.Tensor] = op_args, s: torch.Tensor = s0) -> None:
            with torch.no_grad():
                spec.step(*a, state=s, scale=scale)

        def fla_step(spec: OpSpec = spec, a: list[torch.Tensor] = op_args, s: torch.Tensor = s0) -> None:
            with torch.no_grad():  # T == 1 without grad: fla's recurrent kernel
                spec.dispatch(*a, scale=scale, initial_state=s, output_final_state=True, backend="fla")

        decode[f"{spec.name}_step"] = step
        if not no_fla[spec.name]:
            decode[f"{spec.name}_fla"] = fla_step
    record("decode", cache_len, decode, repeats * 4)
    print(f"\ndecode memory per batch of {dB} (MiB): {json.dumps({k: round(v, 2) for k, v in memory_mib.items()})}")
    for name, err in failed.items():
        print(f"failed: {name}: {err}")

    result = {
        "benchmark": "kernel_speed",
        "config": {"device": args.device, "dtype": str(dtype).removeprefix("torch."), "batch": B, "heads": H,
                   "head_dim": D, "lengths": lengths, "decode_batch": dB, "cache_len": cache_len,
                   "torch_max_t": torch_max_t, "warmup": warmup, "repeats": repeats, "decode_repeats": repeats * 4,
                   "threads": torch.get_num_threads(), "sdpa_backend": sdpa_kind, "quick": args.quick,
                   "autotune_configs": args.autotune_configs, "ops": [s.name for s in specs],
                   "timer": "perf_counter around synchronised calls"},
        "env": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                "cuda_device": torch.cuda.get_device_name() if cuda else None},
        "rows": rows, "skipped": skipped, "failed": failed, "decode_memory_mib": memory_mib,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
