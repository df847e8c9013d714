"""Forward+backward time of the RWKV recurrences against causal softmax attention (SDPA).

    python benchmarks/mixer_speed.py                      # CPU, 1 thread, T = 512 2048 8192
    python benchmarks/mixer_speed.py --threads 2 --repeats 5 --json /tmp/speed.json
    python benchmarks/mixer_speed.py --device cuda        # also times the fla kernels when installed

Each method gets the same [B, T, H, D] fp32 inputs built like RAD-RWKV7's (a = -kappa,
b = kappa * iclr, kappa L2-normalised per head, log-decay in [-exp(-0.5), 0]; RWKV-6 decay in
[-5, 0]); the timed step is one forward and a backward of `out.square().mean()` w.r.t. every input.
Reported: median seconds over `--repeats` after `--warmup` untimed runs (methods timed in turns,
so load from other processes falls on all alike), and the ratio to SDPA measured in the same run.
The naive per-token RWKV-7 loop is timed once, only at the smallest T.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from qwerky.modeling import ops_rwkv6, ops_rwkv7  # noqa: E402

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "mixer_speed.json"


def make_inputs(B: int, T: int, H: int, D: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    kappa = F.normalize(rnd(B, T, H, D), dim=-1)
    iclr = torch.sigmoid(rnd(B, T, H, D))
    x = {
        "r": rnd(B, T, H, D) * D**-0.5,
        "k": rnd(B, T, H, D) * D**-0.5,
        "v": rnd(B, T, H, D),
        "w7": -torch.exp(torch.tensor(-0.5)) * torch.sigmoid(rnd(B, T, H, D)),
        "a": -kappa,
        "b": kappa * iclr,
        "w6": -5.0 * torch.sigmoid(rnd(B, T, H, D)),
        "u": torch.ones(H, D),
    }
    return {n: t.to(device).requires_grad_(True) for n, t in x.items()}


def methods(device: str, fla: bool) -> dict[str, Callable[[dict[str, torch.Tensor]], torch.Tensor]]:
    def sdpa(x):
        q, k, v = (x[n].transpose(1, 2) for n in ("r", "k", "v"))  # (B, H, T, D)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def rwkv7_chunk(x):
        return ops_rwkv7.chunk_rwkv7_torch(x["r"], x["w7"], x["k"], x["v"], x["a"], x["b"])[0]

    def rwkv7_naive(x):
        return ops_rwkv7.naive_recurrent_rwkv7(x["r"], x["w7"], x["k"], x["v"], x["a"], x["b"])[0]

    def rwkv6_chunk(x):
        return ops_rwkv6.chunk_rwkv6_torch(x["r"], x["k"], x["v"], x["w6"], x["u"])[0]

    m = {"sdpa_causal": sdpa, "rwkv7_chunk_torch": rwkv7_chunk, "rwkv6_chunk_torch": rwkv6_chunk,
         "rwkv7_naive": rwkv7_naive}
    if fla:
        m["rwkv7_fla"] = lambda x: ops_rwkv7.rwkv7_attention(
            x["r"], x["w7"], x["k"], x["v"], x["a"], x["b"], backend="fla")[0]
        m["rwkv6_fla"] = lambda x: ops_rwkv6.rwkv6_attention(
            x["r"], x["k"], x["v"], x["w6"], x["u"], backend="fla")[0]
    return m


def fwd_bwd_step(fn: Callable, x: dict[str, torch.Tensor]) -> float:
    """Seconds for one forward + backward (synchronised on CUDA)."""
    cuda = next(iter(x.values())).is_cuda
    for t in x.values():
        t.grad = None
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(x).square().mean().backward()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_round_robin(fns: dict[str, Callable], x: dict[str, torch.Tensor], warmup: int,
                     repeats: int) -> dict[str, list[float]]:
    """Warm every method up, then time them in turns (A B C A B C ...), so that load from other
    processes on a shared machine falls on all methods alike and the ratios stay fair."""
    for fn in fns.values():
        for _ in range(warmup):
            fwd_bwd_step(fn, x)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(fwd_bwd_step(fn, x))
    return times


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-naive", action="store_true", help="do not time the naive RWKV-7 loop")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    fla = args.device.startswith("cuda") and ops_rwkv7.fla_available() and bool(ops_rwkv6._fla())
    fns = methods(args.device, fla)
    rows = []
    naive_T = min(args.lengths)
    print(f"device={args.device} threads={torch.get_num_threads()} B={args.batch} H={args.heads} "
          f"D={args.head_dim} fp32 fwd+bwd, median of {args.repeats} after {args.warmup} warm-up; fla={fla}")
    print(f"{'T':>6}  {'method':<20} {'median s':>10} {'min s':>10} {'x SDPA':>8}")
    for T in args.lengths:
        x = make_inputs(args.batch, T, args.heads, args.head_dim, args.device)
        timed = {n: f for n, f in fns.items() if n != "rwkv7_naive"}
        times = time_round_robin(timed, x, args.warmup, args.repeats)
        if "rwkv7_naive" in fns and not args.skip_naive and T == naive_T:
            times["rwkv7_naive"] = [fwd_bwd_step(fns["rwkv7_naive"], x)]  # seconds per call: once is enough
        sdpa_s = statistics.median(times["sdpa_causal"])
        for name, ts in times.items():
            med = statistics.median(ts)
            ratio = med / sdpa_s
            rows.append({"T": T, "method": name, "median_s": med, "min_s": min(ts), "times_s": ts,
                         "ratio_to_sdpa": ratio})
            print(f"{T:>6}  {name:<20} {med:>10.4f} {min(ts):>10.4f} {ratio:>8.2f}", flush=True)
    result = {
        "benchmark": "mixer_speed",
        "config": {"batch": args.batch, "heads": args.heads, "head_dim": args.head_dim, "dtype": "float32",
                   "threads": torch.get_num_threads(), "device": args.device, "warmup": args.warmup,
                   "repeats": args.repeats, "fla": fla},
        "env": {"torch": torch.__version__, "python": platform.python_version(),
                "machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                "cuda_device": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
        "targets": {"rwkv7_chunk_torch_vs_sdpa": {"2048": 1.0, "8192": 0.5}},
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
