"""One-shot GPU check: fla kernels against the PyTorch forms, converted models on CUDA, and speed vs SDPA.

Why this exists: CI and development machines here have no GPU, so the CUDA path (flash-linear-attention's
Triton kernels behind `rwkv7_attention` / `rwkv6_attention`, the models' auto dispatch, bf16 autocast) is
only ever exercised on a borrowed GPU for a few minutes. This script gathers, in one run, everything we
want to know from such a loan:

1. env: versions (torch, triton, fla, transformers), the device, whether the fla kernels import.
2. kernels: RWKV-7 and RWKV-6 outputs, final states and the gradients of every input, fla (fp32 and bf16)
   against the chunked PyTorch form on CUDA and a float64 naive recurrence; non-contiguous inputs; the
   no-grad T=1 decode path (fla's fused_recurrent) against the PyTorch step, single and chained.
3. model: a tiny random Qwen2 teacher converted to rwkv7 / rwkv6 / window students; logits on CPU fp32
   against CUDA fp32 (auto dispatch -> fla), CUDA with the torch kernels, and CUDA bf16 autocast;
   chunked prefill + token-by-token decode against the parallel logits; greedy generation CPU vs CUDA.
4. speed (CUDA): forward+backward and forward-only time of fla RWKV-7 against SDPA causal (flash) at
   7B-like head geometry, and one decode step from a [64, 32, 128, 128] state against SDPA over an
   8192-token KV cache.

Every section and every case inside it runs in try/except: a failure records its traceback in the JSON and
the script goes on. The JSON is written atomically after every case, so a run cut short by a timeout still
leaves everything finished so far. A time budget (--budget-s, default 85 s) is split between the sections
(kernels 40 %, model 25 %, speed 35 % of it, counted from the start): a case starts only before its
section's deadline, else it is recorded as "skipped: time budget", so one slow section cannot starve the
others. The budget governs when cases start, not how long a started one runs: the first fla call of each
dtype / head size includes Triton compilation and autotuning, which dominates a run on a fresh machine
(its wall time is recorded: "seconds" of each kernel variant, "warmup_s" of each timing).

    python benchmarks/gpu_check.py --json $OUT/gpu_check.json                 # on the GPU (~90 s)
    python benchmarks/gpu_check.py --quick --json /tmp/gpu_check.json         # tiny sizes; CPU dry run
    python benchmarks/gpu_check.py --sections speed --budget-s 200            # rerun one section
    python benchmarks/gpu_check.py --autotune-configs 1                       # cap Triton autotuning
    python benchmarks/gpu_check.py --quick --fake-fla                         # CPU self-test of the fla branches

On a machine without CUDA the CUDA-only parts are reported as skipped and the rest runs on the CPU (the
"device" columns then read cpu: a dry run of the script logic, not a GPU result).
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _import_ops() -> tuple[Any, Any, str | None]:
    """qwerky's ops_rwkv7 / ops_rwkv6. They import nothing from qwerky, so when the package itself fails to
    import (e.g. transformers missing or a half-edited module), they are loaded from their files instead and
    the kernel sections still run; the model section then reports the import error."""
    try:
        from qwerky.modeling import ops_rwkv6, ops_rwkv7

        return ops_rwkv7, ops_rwkv6, None
    except Exception:  # noqa: BLE001
        import importlib.util

        error = traceback.format_exc()
        mods = []
        for name in ("ops_rwkv7", "ops_rwkv6"):
            spec = importlib.util.spec_from_file_location(f"_gpu_check_{name}",
                                                          ROOT / "src" / "qwerky" / "modeling" / f"{name}.py")
            assert spec is not None and spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            mods.append(mod)
        return mods[0], mods[1], error


ops_rwkv7, ops_rwkv6, OPS_IMPORT_ERROR = _import_ops()

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "gpu_check.json"
SECTIONS = ("env", "kernels", "model", "speed")
BUDGET_SHARE = {"env": 0.0, "kernels": 0.4, "model": 0.25, "speed": 0.35}  # of --budget-s, among those run
W_MIN7 = -math.exp(-0.5)  # RAD-RWKV7's lowest log-decay
W_MIN6 = -5.0  # RAD-RWKV6 clamps its log-decay here

Tensors = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------- report


class Report:
    """Results tree, written atomically to `path` after every case; sections and cases catch exceptions."""

    def __init__(self, path: Path, budget_s: float, meta: dict[str, Any]) -> None:
        self.path = path
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.deadline_s = budget_s  # cases of the current section start only before this (see section())
        self.data: dict[str, Any] = {"script": "benchmarks/gpu_check.py", **meta, "sections": {}, "warnings": [],
                                     "finished": False}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.deadline_s - self.elapsed()

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_clean(self.data), indent=1) + "\n")
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def section(self, name: str, deadline_s: float) -> Iterator[dict[str, Any]]:
        """A section whose cases start only before `deadline_s` (seconds since start), so that a slow section
        (Triton compiling) leaves the later ones their share of the budget."""
        self.deadline_s = deadline_s
        sec: dict[str, Any] = {"status": "running", "cases": {}, "deadline_s": round(deadline_s, 1)}
        self.data["sections"][name] = sec
        print(f"\n## {name}\n\n(cases start until {deadline_s:.0f} s; {self.elapsed():.0f} s used)\n", flush=True)
        self.save()
        t0 = time.perf_counter()
        try:
            yield sec
            if sec["status"] == "running":
                bad = [c for c in sec["cases"].values() if c.get("status") == "error"]
                sec["status"] = "partial" if bad else "ok"
        except Exception:  # noqa: BLE001 - the point is to record and go on
            sec["status"] = "error"
            sec["traceback"] = traceback.format_exc()
            print(f"**{name} failed**\n```\n{sec['traceback']}```", flush=True)
        finally:
            sec["seconds"] = round(time.perf_counter() - t0, 2)
            _free_cuda()
            self.save()

    @contextlib.contextmanager
    def case(self, sec: dict[str, Any], name: str, min_left_s: float = 0.0) -> Iterator[dict[str, Any] | None]:
        """One case of a section; yields None (and records a skip) when the time budget is spent."""
        if self.left() < min_left_s:
            reason = f"time budget ({self.elapsed():.0f} s used, section deadline {self.deadline_s:.0f} s)"
            sec["cases"][name] = {"status": "skipped", "reason": reason}
            print(f"- {name}: skipped, {reason}", flush=True)
            self.save()
            yield None
            return
        case: dict[str, Any] = {"status": "running"}
        sec["cases"][name] = case
        self.save()  # a run killed inside this case shows it as "running"
        t0 = time.perf_counter()
        try:
            yield case
            if case["status"] == "running":
                case["status"] = "ok"
        except Exception:  # noqa: BLE001
            case["status"] = "error"
            case["traceback"] = traceback.format_exc()
            print(f"- {name}: **error** {traceback.format_exc().strip().splitlines()[-1]}", flush=True)
        finally:
            case["seconds"] = round(time.perf_counter() - t0, 2)
            _free_cuda()
            self.save()


def _clean(x: Any) -> Any:
    """JSON-safe copy: non-finite floats become strings, tuples lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _free_cuda() -> None:
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def record_warnings(store: list[dict[str, str]]) -> None:
    """Keep every distinct warning (fla warns about layouts, dtypes, ...) in the report as well."""
    original = warnings.showwarning
    seen: set[tuple[str, str]] = set()

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        key = (category.__name__, str(message)[:300])
        if key not in seen:
            seen.add(key)
            store.append({"category": key[0], "message": key[1], "where": f"{filename}:{lineno}"})
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if math.isfinite(v) else str(v)
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def limit_triton_autotune(n: int) -> None:
    """Keep only the first `n` configs of every @triton.autotune defined from now on (before fla imports):
    trades kernel speed for compile time. Opt-in (--autotune-configs); timings then understate fla."""
    import triton  # type: ignore

    real = triton.autotune

    def autotune(*args: Any, **kwargs: Any) -> Any:
        if args:
            args = (list(args[0])[:n], *args[1:])
        elif "configs" in kwargs:
            kwargs["configs"] = list(kwargs["configs"])[:n]
        return real(*args, **kwargs)

    triton.autotune = autotune


# ---------------------------------------------------------------------------------------------- comparisons


def compare(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """max |x - ref| and the norm ratio ||x - ref|| / ||ref|| (inf when anything is not finite)."""
    a, b = x.detach().double().cpu(), ref.detach().double().cpu()
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return {"max_abs": math.inf, "rel": math.inf}
    d = a - b
    den = b.norm().item()
    return {"max_abs": d.abs().max().item(), "rel": d.norm().item() / den if den > 0 else d.norm().item()}


def compare_all(got: Tensors, ref: Tensors) -> dict[str, dict[str, float]]:
    return {n: compare(got[n], ref[n]) for n in ref if n in got}


def summarize(errs: dict[str, dict[str, float]]) -> list[Any]:
    """[o rel, state rel, worst grad 'name rel', max abs over all] for a table row."""
    grads = {n: e for n, e in errs.items() if n.startswith("d")}
    worst = max(grads, key=lambda n: grads[n]["rel"]) if grads else None
    return [errs.get("o", {}).get("rel", "-"), errs.get("state", {}).get("rel", "-"),
            f"{worst} {grads[worst]['rel']:.3g}" if worst else "-",
            max((e["max_abs"] for e in errs.values()), default="-")]


def logits_metrics(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Relative error, KL(ref || x) per token (nats) and top-1 agreement of logits [..., V]."""
    a, b = x.detach().double().cpu(), ref.detach().double().cpu()
    out = compare(a, b)
    logp, logq = F.log_softmax(b, -1), F.log_softmax(a, -1)
    out["kl"] = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    out["top1_agree"] = (a.argmax(-1) == b.argmax(-1)).double().mean().item()
    return out


# ---------------------------------------------------------------------------------------------- kernels


def ref_rwkv7(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
              b: torch.Tensor, scale: float, s0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent per-token RWKV-7 recurrence in the inputs' dtype (float64 here):
    S_t = diag(exp(w_t)) S + b_t (a_t^T S) + k_t v_t^T, o_t = scale * S_t^T r_t."""
    B, T, H, K = r.shape
    S = r.new_zeros(B, H, K, v.shape[-1]) if s0 is None else s0
    out = []
    for t in range(T):
        sa = a[:, t, :, None, :] @ S
        S = S * w[:, t].exp()[..., None] + b[:, t, :, :, None] * sa + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append((r[:, t, :, None, :] @ S).squeeze(-2) * scale)
    return torch.stack(out, 1), S


def ref_rwkv6(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
              scale: float, s0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent per-token RWKV-6 recurrence: o_t = scale * r_t^T (S + diag(u) k_t v_t^T), then decay."""
    B, T, H, K = r.shape
    S = r.new_zeros(B, H, K, v.shape[-1]) if s0 is None else s0
    out = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append((r[:, t, :, None, :] @ (S + u[None, :, :, None] * kv)).squeeze(-2) * scale)
        S = S * w[:, t].exp()[..., None] + kv
    return torch.stack(out, 1), S


def inputs_rwkv7(B: int, T: int, H: int, D: int, seed: int, state: bool, device: str = "cpu") -> Tensors:
    """RAD-RWKV7-like inputs as in tests/modeling/test_ops_rwkv7.py (a = -kappa, b = kappa * iclr)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device)

    kappa = F.normalize(rnd(B, T, H, D), dim=-1)
    x = {"r": rnd(B, T, H, D), "w": W_MIN7 * torch.sigmoid(rnd(B, T, H, D)), "k": rnd(B, T, H, D) * D**-0.5,
         "v": rnd(B, T, H, D), "a": -kappa, "b": kappa * torch.sigmoid(rnd(B, T, H, D))}
    if state:
        x["s0"] = rnd(B, H, D, D) * 0.5
    return x


def inputs_rwkv6(B: int, T: int, H: int, D: int, seed: int, state: bool, device: str = "cpu") -> Tensors:
    """RAD-RWKV6-like inputs: log-decay in [-5, 0], k scaled by (1 - exp(w)), bonus u = 1."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device)

    w = W_MIN6 * torch.sigmoid(rnd(B, T, H, D))
    x = {"r": rnd(B, T, H, D), "k": rnd(B, T, H, D) * D**-0.5 * (1 - w.exp()), "v": rnd(B, T, H, D), "w": w,
         "u": torch.ones(H, D, device=device)}
    if state:
        x["s0"] = rnd(B, H, D, D) * 0.5
    return x


@dataclass
class Op:
    name: str
    args: tuple[str, ...]  # positional order of the dispatch / reference
    dispatch: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    reference: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    make: Callable[..., Tensors]
    fla: Callable[[], bool]


OPS = (
    Op("rwkv7", ("r", "w", "k", "v", "a", "b"), ops_rwkv7.rwkv7_attention, ref_rwkv7, inputs_rwkv7,
       ops_rwkv7.fla_available),
    Op("rwkv6", ("r", "k", "v", "w", "u"), ops_rwkv6.rwkv6_attention, ref_rwkv6, inputs_rwkv6,
       lambda: bool(ops_rwkv6._fla())),
)


def leaves_on(x: Tensors, device: str, dtype: torch.dtype, grad: bool = True) -> Tensors:
    """Copies on `device`; inputs in `dtype`, the initial state always fp32 (or fp64 for the reference)."""
    out = {}
    for n, t in x.items():
        dt = (torch.float64 if dtype == torch.float64 else torch.float32) if n == "s0" else dtype
        out[n] = t.detach().to(device=device, dtype=dt).requires_grad_(grad)
    return out


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values as `t` [B, T, H, D] but laid out [B, H, T, D] in memory (what RoPE's transposes give)."""
    buf = t.detach().transpose(1, 2).contiguous()
    view = buf.transpose(1, 2)
    assert not view.is_contiguous() and torch.equal(view, t.detach())
    return view.requires_grad_(t.requires_grad)


def run_kernel(op: Op, x: Tensors, backend: str, scale: float, proj: Tensors, grad: bool = True) -> Tensors:
    """(o, final state, and with grad the gradients of every leaf for a fixed random projection loss)."""
    args = [x[n] for n in op.args]
    s0 = x.get("s0")
    if backend == "ref":
        o, s = op.reference(*args, scale, s0)
    else:
        o, s = op.dispatch(*args, scale=scale, initial_state=s0, output_final_state=True, backend=backend)
    if s is None:
        raise RuntimeError(f"{op.name}/{backend}: no final state returned with output_final_state=True")
    out = {"o": o.detach(), "state": s.detach()}
    if grad:
        go, gs = (proj[n].to(device=o.device, dtype=torch.float64 if o.dtype == torch.float64 else torch.float32)
                  for n in ("o", "state"))
        loss = (o.to(go.dtype) * go).sum() + (s.to(gs.dtype) * gs).sum()
        names = list(x)
        for n, gr in zip(names, torch.autograd.grad(loss, [x[n] for n in names], allow_unused=True)):
            out[f"d{n}"] = torch.zeros_like(x[n]) if gr is None else gr
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fla_skip_reason(args: argparse.Namespace, device: str, available: Callable[[], bool]) -> str | None:
    """Why the fla variants cannot run here, or None when they can."""
    if device != "cuda" and not args.fake_fla:
        return "no CUDA device"
    return None if available() else "fla not importable"


def install_fake_fla() -> None:
    """--fake-fla (self-test of this script on a CPU): the PyTorch forms stand in for fla's kernels, with
    fla's signatures, so that every fla branch of the script runs. Its "fla" numbers mean nothing."""
    def chunk7(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               scale: float = 1.0, initial_state: torch.Tensor | None = None, output_final_state: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return ops_rwkv7.chunk_rwkv7_torch(r, w, k, v, a, b, scale, initial_state, output_final_state)

    def step7(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              scale: float = 1.0, initial_state: torch.Tensor | None = None, output_final_state: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return ops_rwkv7.naive_recurrent_rwkv7(r, w, k, v, a, b, scale, initial_state, output_final_state)

    def chunk6(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
               scale: float = 1.0, initial_state: torch.Tensor | None = None, output_final_state: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return ops_rwkv6.chunk_rwkv6_torch(r, k, v, w, u, scale, initial_state, output_final_state)

    def step6(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
              scale: float = 1.0, initial_state: torch.Tensor | None = None, output_final_state: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return ops_rwkv6.naive_recurrent_rwkv6(r, k, v, w, u, scale, initial_state, output_final_state)

    ops_rwkv7._FLA = {"chunk": chunk7, "recurrent": step7}
    ops_rwkv6._FLA = {"chunk": chunk6, "recurrent": step6}


@dataclass
class KernelSetup:
    B: int
    H: int
    D: int
    scale: float
    device: str  # where the torch and fla forms run
    ref_device: str  # where the float64 loop runs
    ref_max_t: int
    no_fla: str | None  # why fla is skipped, None when it runs


KERNEL_HEADERS = ["op", "T", "s0", "compare", "o rel", "state rel", "worst grad rel", "max abs"]


def compare_pairs(case: dict[str, Any], res: dict[str, Tensors], pairs: list[tuple[str, str]], op: str,
                  label: Any, has_state: bool) -> None:
    """Fill case["compare"] for every pair whose both sides ran, and print the table."""
    case["compare"], rows = {}, []
    for got, ref in pairs:
        if got in res and ref in res:
            key = f"{got} vs {ref}"
            try:
                errs = compare_all(res[got], res[ref])
            except Exception as e:  # noqa: BLE001 - e.g. a kernel returned a state of another shape
                case["compare"][key] = {"error": f"{type(e).__name__}: {e}"}
                case["status"] = "error"
                rows.append([op, label, has_state, key, "error", f"{type(e).__name__}: {e}"[:90], "-", "-"])
                continue
            case["compare"][key] = errs
            rows.append([op, label, has_state, key, *summarize(errs)])
    print(md_table(KERNEL_HEADERS, rows), "\n", flush=True)


def run_variant(case: dict[str, Any], res: dict[str, Tensors], key: str, fn: Callable[[], Tensors],
                skip: str | None = None) -> None:
    """res[key] = fn(), its status and wall time (first fla calls include Triton compilation) in case."""
    if skip is None and key.startswith("fla_f32") and os.environ.get("GPU_CHECK_NO_FLA_F32"):
        skip = "GPU_CHECK_NO_FLA_F32 set (fla's fp32 kernels compiled for minutes on an H100)"
    if skip:
        case["variants"][key] = {"status": "skipped", "reason": skip}
        return
    t0 = time.perf_counter()
    try:
        res[key] = fn()
        sync()
        case["variants"][key] = {"status": "ok", "seconds": round(time.perf_counter() - t0, 3)}
    except Exception:  # noqa: BLE001
        case["variants"][key] = {"status": "error", "traceback": traceback.format_exc()}
        case["status"] = "error"
        print(f"- {key}: **error** {traceback.format_exc().strip().splitlines()[-1]}", flush=True)


def kernel_case(case: dict[str, Any], op: Op, ks: KernelSetup, T: int, seed: int, state: bool,
                noncontig: bool) -> None:
    """fla fp32 / bf16, torch fp32 and the float64 loop on the same inputs: outputs, final state, grads."""
    B, H, D = ks.B, ks.H, ks.D
    x = op.make(B, T, H, D, seed=seed, state=state)
    g = torch.Generator().manual_seed(seed + 1)
    proj = {"o": torch.randn(B, T, H, D, generator=g, dtype=torch.float64),
            "state": torch.randn(B, H, D, D, generator=g, dtype=torch.float64)}
    res: dict[str, Tensors] = {}
    case["variants"] = {}

    def on(device: str, dtype: torch.dtype, backend: str, layout: str = "contiguous") -> Callable[[], Tensors]:
        def fn() -> Tensors:
            xs = leaves_on(x, device, dtype)
            if layout == "noncontiguous":
                xs = {n: noncontiguous(t) if t.dim() == 4 and n != "s0" else t for n, t in xs.items()}
            return run_kernel(op, xs, backend, ks.scale, proj)
        return fn

    run_variant(case, res, "ref_f64", on(ks.ref_device, torch.float64, "ref"),
                None if T <= ks.ref_max_t else f"T > ref_max_t {ks.ref_max_t}")
    run_variant(case, res, "torch_f32", on(ks.device, torch.float32, "torch"))
    run_variant(case, res, "fla_f32", on(ks.device, torch.float32, "fla"), ks.no_fla)
    run_variant(case, res, "fla_bf16", on(ks.device, torch.bfloat16, "fla"), ks.no_fla)
    if noncontig:
        run_variant(case, res, "fla_f32_noncontig", on(ks.device, torch.float32, "fla", "noncontiguous"), ks.no_fla)
    pairs = [("torch_f32", "ref_f64"), ("fla_f32", "ref_f64"), ("fla_f32", "torch_f32"),
             ("fla_bf16", "torch_f32"), ("fla_bf16", "ref_f64"), ("fla_f32_noncontig", "fla_f32")]
    compare_pairs(case, res, pairs, op.name, T, state)


def token_slice(x: Tensors, t: int) -> Tensors:
    """Token t of every per-token input ([B, T, H, D]); the state s0 and the bonus u are kept whole."""
    return {n: (v[:, t:t + 1] if n not in ("s0", "u") else v) for n, v in x.items()}


def decode_case(case: dict[str, Any], op: Op, ks: KernelSetup, steps: int) -> None:
    """No-grad T=1 calls (fla: fused_recurrent) from a non-zero state: one step, and `steps` chained steps
    against the chunked torch form over the same tokens."""
    B, H, D = ks.B, ks.H, ks.D
    x = op.make(B, steps, H, D, seed=99, state=True)
    case["config"] = {"steps": steps, "grad": False, "fla path": "T == 1 without grad -> fused_recurrent"}
    case["variants"] = {}
    res: dict[str, Tensors] = {}
    first = token_slice(x, 0)

    def call(xs: Tensors, device: str, dtype: torch.dtype, backend: str) -> Callable[[], Tensors]:
        def fn() -> Tensors:
            with torch.no_grad():
                return run_kernel(op, leaves_on(xs, device, dtype, grad=False), backend, ks.scale, {}, grad=False)
        return fn

    def chained() -> Tensors:
        with torch.no_grad():
            xs = leaves_on(x, ks.device, torch.float32, grad=False)
            state, outs = xs["s0"], []
            for t in range(steps):
                r = run_kernel(op, {**token_slice(xs, t), "s0": state}, "fla", ks.scale, {}, grad=False)
                outs.append(r["o"])
                state = r["state"]
            return {"o": torch.cat(outs, 1), "state": state}

    run_variant(case, res, "ref_f64 1 step", call(first, ks.ref_device, torch.float64, "ref"))
    run_variant(case, res, "torch_f32 1 step", call(first, ks.device, torch.float32, "torch"))
    run_variant(case, res, "fla_f32 1 step", call(first, ks.device, torch.float32, "fla"), ks.no_fla)
    run_variant(case, res, "fla_bf16 1 step", call(first, ks.device, torch.bfloat16, "fla"), ks.no_fla)
    run_variant(case, res, "ref_f64 chained", call(x, ks.ref_device, torch.float64, "ref"))
    run_variant(case, res, "torch_f32 chunked", call(x, ks.device, torch.float32, "torch"))
    run_variant(case, res, "fla_f32 chained", chained, ks.no_fla)
    pairs = [("torch_f32 1 step", "ref_f64 1 step"), ("fla_f32 1 step", "ref_f64 1 step"),
             ("fla_f32 1 step", "torch_f32 1 step"), ("fla_bf16 1 step", "torch_f32 1 step"),
             ("torch_f32 chunked", "ref_f64 chained"), ("fla_f32 chained", "ref_f64 chained"),
             ("fla_f32 chained", "torch_f32 chunked")]
    compare_pairs(case, res, pairs, op.name, "decode", True)


def section_kernels(rep: Report, sec: dict[str, Any], args: argparse.Namespace, device: str) -> None:
    cuda = device == "cuda"
    lengths = [64, 200] if args.quick else [64, 1000, 4096]
    with_state = {lengths[0]} if args.quick else {lengths[0], lengths[1]}
    # the float64 loop: on the GPU up to --ref-max-t; on a CPU only at small T (its backward is slow there)
    ref_max_t = args.ref_max_t if cuda else (max(lengths) if args.quick else min(lengths))
    D = 64
    sec["config"] = {"B": 2, "H": 4, "D": D, "lengths": lengths, "initial_state_at": sorted(with_state),
                     "scale": D**-0.5, "reference": f"float64 naive loop on {device}, T <= {ref_max_t}",
                     "rel": "||x - ref|| / ||ref||", "loss": "sum(o * Go) + sum(S_T * Gs), Go, Gs ~ N(0, 1)"}
    setups = {op.name: KernelSetup(B=2, H=4, D=D, scale=D**-0.5, device=device, ref_device=device,
                                   ref_max_t=ref_max_t, no_fla=fla_skip_reason(args, device, op.fla)) for op in OPS}
    # shortest T and decode of both ops first (they pay the Triton compilation), then the long T's
    for i, T in enumerate(lengths):
        for op in OPS:
            with rep.case(sec, f"{op.name} T={T}", min_left_s=2) as case:
                if case is not None:
                    kernel_case(case, op, setups[op.name], T, seed=1000 * i + T, state=T in with_state,
                                noncontig=i == 0)
        if i == 0:
            for op in OPS:
                with rep.case(sec, f"{op.name} decode", min_left_s=1) as case:
                    if case is not None:
                        decode_case(case, op, setups[op.name], steps=16)


# ---------------------------------------------------------------------------------------------- model


def tiny_teacher(seed: int = 0) -> torch.nn.Module:
    """Random Qwen2: hidden 256, 4 layers, 4 heads (2 key/value heads, head_dim 64), vocab 1024
    (the geometry of tests/qwerky_testing.py's tiny_config, scaled up)."""
    import transformers as tf

    cfg = tf.Qwen2Config(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


MODEL_HEADERS = ["mixer", "run", "vs", "rel", "max abs", "KL", "top-1 agree"]


def model_case(case: dict[str, Any], teacher: torch.nn.Module, x: torch.Tensor, mixer: str, device: str,
               tail: int, prompt_len: int, new_tokens: int) -> None:
    """One student: CPU fp32 logits and greedy tokens, then the same weights on `device`."""
    from qwerky.surgery import convert_teacher

    B, T = x.shape
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    student = convert_teacher(teacher, mixer=mixer, window_size=64, num_sinks=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # give the new (zero-initialised) parts an effect, so the comparison means something
        for p in student.parameters():
            if p.data_ptr() not in teacher_ptrs:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    student.set_backend("auto")
    mask = torch.ones_like(x[:, :prompt_len])
    gen_kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cpu_logits = student(x).logits.float()
    gen_cpu = student.generate(x[:, :prompt_len], attention_mask=mask, **gen_kwargs)
    student.to(device)
    xd = x.to(device)
    runs: dict[str, torch.Tensor] = {"cpu_f32": cpu_logits}
    case["runs"], rows = {}, []

    def run(key: str, ref_key: str, fn: Callable[[], torch.Tensor], diagnostic: bool = False) -> None:
        """Logits of fn() against runs[ref_key] (its last positions when fn gives fewer). A failing
        diagnostic run is recorded without marking the case as failed."""
        try:
            with torch.no_grad():
                runs[key] = fn().float()
            ref = runs[ref_key][:, -runs[key].shape[1]:]
            m = logits_metrics(runs[key], ref)
            case["runs"][f"{key} vs {ref_key}"] = m
            rows.append([mixer, key, ref_key, m["rel"], m["max_abs"], m["kl"], m["top1_agree"]])
        except Exception:  # noqa: BLE001
            last = traceback.format_exc().strip().splitlines()[-1]
            case["runs"][key] = {"status": "error", "diagnostic": diagnostic, "traceback": traceback.format_exc()}
            rows.append([mixer, key, ref_key, "error" + (" (diagnostic)" if diagnostic else ""), last[:90], "-", "-"])
            if not diagnostic:
                case["status"] = "error"

    def with_backend(backend: str, autocast: bool = False) -> torch.Tensor:
        student.set_backend(backend)
        try:
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
                return student(xd).logits
        finally:
            student.set_backend("auto")

    def decode(prefill: int) -> torch.Tensor:
        """Logits of the last `tail` positions: `prefill` tokens in one call, then one token per call."""
        state = student.init_state(B, device)
        if prefill:
            student(xd[:, :prefill], past_key_values=state, use_cache=True)
        logits = [student(xd[:, i:i + 1], past_key_values=state, use_cache=True).logits for i in range(prefill, T)]
        return torch.cat(logits[-tail:], 1)

    cuda = device == "cuda"
    run(f"{device}_f32_auto", "cpu_f32", lambda: with_backend("auto"))
    run(f"{device}_f32_torch", "cpu_f32", lambda: with_backend("torch"))
    # auto under autocast: fla on CUDA; on a CPU it is the torch form, which is the diagnostic case below
    run(f"{device}_bf16_autocast", "cpu_f32", lambda: with_backend("auto", autocast=True), diagnostic=not cuda)
    if cuda:  # does the PyTorch chunked form survive bf16 autocast (its bmm's turn bf16)?
        run("cuda_bf16_autocast_torch", "cpu_f32", lambda: with_backend("torch", autocast=True), diagnostic=True)
    run(f"{device}_decode_all_steps", f"{device}_f32_auto", lambda: decode(0))  # T single-token calls
    run(f"{device}_prefill+decode", f"{device}_f32_auto", lambda: decode(T - tail))  # the serving path
    try:
        gen = student.generate(xd[:, :prompt_len], attention_mask=mask.to(device), **gen_kwargs).cpu()
        new, ref = gen[:, prompt_len:], gen_cpu[:, prompt_len:]
        same = new == ref
        first_diff = [int((~row).nonzero()[0]) if (~row).any() else None for row in same]
        case["generate"] = {"agree_fraction": same.double().mean().item(), "first_divergence": first_diff,
                            "cpu": ref.tolist(), device: new.tolist()}
        rows.append([mixer, f"{device} greedy generate", "cpu greedy", "-", "-", "-",
                     f"{case['generate']['agree_fraction']:.3f} (first diff {first_diff})"])
    except Exception:  # noqa: BLE001
        case["generate"] = {"status": "error", "traceback": traceback.format_exc()}
        case["status"] = "error"
        rows.append([mixer, f"{device} greedy generate", "cpu greedy", "error",
                     traceback.format_exc().strip().splitlines()[-1][:90], "-", "-"])
    print(md_table(MODEL_HEADERS, rows), "\n", flush=True)


def section_model(rep: Report, sec: dict[str, Any], args: argparse.Namespace, device: str) -> None:
    B, T, tail, prompt_len, new_tokens = 2, 300, 20, 32, 16
    teacher = tiny_teacher()
    x = torch.randint(0, 1024, (B, T), generator=torch.Generator().manual_seed(0))
    sec["config"] = {"teacher": "qwen2 hidden 256, 4 layers, 4 heads / 2 kv, vocab 1024", "batch": [B, T],
                     "new params": "perturbed by N(0, 0.05^2) so that every new part has an effect",
                     "window": {"window_size": 64, "num_sinks": 4},
                     "decode": f"last {tail} positions: all {T} tokens one per call (all_steps), or a {T - tail}-token "
                               f"prefill then one per call (prefill+decode), vs the parallel fp32 logits",
                     "generate": f"greedy, prompt {prompt_len}, {new_tokens} new tokens",
                     "kl": "KL(reference || run) per token, nats", "rel": "||x - ref|| / ||ref|| of the logits",
                     "device": device if device == "cuda" else "cpu (dry run: no CUDA)"}
    for mixer in ("rwkv7", "rwkv6", "window"):
        with rep.case(sec, mixer, min_left_s=2) as case:
            if case is not None:
                model_case(case, teacher, x, mixer, device, tail, prompt_len, new_tokens)


# ---------------------------------------------------------------------------------------------- speed


def bench(fn: Callable[[], Any], warmup: int, reps: int, cuda: bool) -> dict[str, Any]:
    """Warm-up calls (the first one includes Triton compile/autotune: its wall time is reported), then
    `reps` timed calls (CUDA events on the GPU, perf_counter on the CPU); milliseconds."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        fn()
    if cuda:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    out: dict[str, Any] = {"median_ms": statistics.median(times), "min_ms": min(times), "times_ms": times,
                           "warmup_s": round(first_s, 3)}
    if cuda:
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def sdpa_context(device: str) -> tuple[Callable[[], Any], str]:
    """SDPA's flash backend when this torch can select it and it runs here; otherwise torch's default choice."""
    if device != "cuda":
        return contextlib.nullcontext, "default (CPU)"
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q = torch.randn(1, 2, 16, 64, device=device, dtype=torch.bfloat16)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return (lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])), "flash"
    except Exception as e:  # noqa: BLE001
        return contextlib.nullcontext, f"default (flash unavailable: {type(e).__name__}: {str(e)[:200]})"


SPEED_HEADERS = ["T", "method", "pass", "median ms", "min ms", "x SDPA", "warm-up s", "peak GiB"]


def time_methods(case: dict[str, Any], rows: list[list[Any]], label: Any, mode: str,
                 methods: dict[str, Callable[[], Any] | str], warmup: int, reps: int, cuda: bool) -> None:
    """Time each method (a string is a skip reason); the first method is the baseline of the ratios."""
    base = None
    for i, (name, fn) in enumerate(methods.items()):
        key = f"{name} {mode}"
        if isinstance(fn, str):
            case["timings"][key] = {"status": "skipped", "reason": fn}
            rows.append([label, name, mode, "skipped", fn, "-", "-", "-"])
            continue
        try:
            r = bench(fn, warmup, reps, cuda)
        except Exception:  # noqa: BLE001
            case["timings"][key] = {"status": "error", "traceback": traceback.format_exc()}
            case["status"] = "error"
            rows.append([label, name, mode, "error", traceback.format_exc().strip().splitlines()[-1][:90],
                         "-", "-", "-"])
            _free_cuda()
            continue
        base = r["median_ms"] if i == 0 else base
        r["ratio_to_sdpa"] = r["median_ms"] / base if base else None
        case["timings"][key] = r
        rows.append([label, name, mode, r["median_ms"], r["min_ms"], r["ratio_to_sdpa"] or "-", r["warmup_s"],
                     r.get("peak_mem_gib", "-")])


@dataclass
class SpeedSetup:
    B: int
    H: int
    D: int
    torch_at: int  # the only T at which the (slow) chunked PyTorch form is timed
    dB: int  # decode batch
    cache_len: int  # SDPA decode: tokens in the KV cache
    warmup: int
    reps: int
    device: str
    no_fla: str | None
    sdpa_ctx: Callable[[], Any]


def speed_train_prefill(case: dict[str, Any], ss: SpeedSetup, T: int) -> None:
    """bf16 forward+backward (gradients of every input) and forward-only: SDPA causal, fla, torch (fp32)."""
    B, H, D, dev = ss.B, ss.H, ss.D, ss.device
    x = inputs_rwkv7(B, T, H, D, seed=T, state=False, device=dev)
    bt = {n: t.to(torch.bfloat16).requires_grad_(True) for n, t in x.items()}
    del x
    g = torch.Generator(device=dev).manual_seed(0)
    go = torch.randn(B, T, H, D, generator=g, device=dev, dtype=torch.bfloat16)
    qkv = [torch.randn(B, H, T, D, generator=g, device=dev, dtype=torch.bfloat16).requires_grad_(True)
           for _ in range(3)]
    go_sdpa = go.transpose(1, 2).contiguous()

    def sdpa() -> torch.Tensor:
        with ss.sdpa_ctx():
            return F.scaled_dot_product_attention(*qkv, is_causal=True)

    def rwkv7(xs: Tensors, backend: str) -> torch.Tensor:
        return ops_rwkv7.rwkv7_attention(*(xs[n] for n in OPS[0].args), scale=D**-0.5, output_final_state=False,
                                         backend=backend)[0]

    def fwd_bwd(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], grad_out: torch.Tensor
                ) -> Callable[[], None]:
        def run() -> None:
            torch.autograd.grad(fn(), leaves, grad_out)
        return run

    def fwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                fn()
        return run

    def fla_fn() -> torch.Tensor:
        return rwkv7(bt, "fla")

    case["timings"], rows = {}, []
    train: dict[str, Callable[[], Any] | str] = {
        "sdpa_causal": fwd_bwd(sdpa, qkv, go_sdpa),
        "rwkv7_fla": ss.no_fla or fwd_bwd(fla_fn, list(bt.values()), go)}
    prefill: dict[str, Callable[[], Any] | str] = {"sdpa_causal": fwd(sdpa), "rwkv7_fla": ss.no_fla or fwd(fla_fn)}
    if T == ss.torch_at:  # fp32: the form a GPU without fla trains with
        f32 = {n: t.detach().float().requires_grad_(True) for n, t in bt.items()}

        def torch_fn() -> torch.Tensor:
            return rwkv7(f32, "torch")

        train["rwkv7_torch_f32"] = fwd_bwd(torch_fn, list(f32.values()), go.float())
        prefill["rwkv7_torch_f32"] = fwd(torch_fn)
    time_methods(case, rows, T, "fwd+bwd", train, ss.warmup, ss.reps, dev == "cuda")
    time_methods(case, rows, T, "fwd", prefill, ss.warmup, ss.reps, dev == "cuda")
    print(md_table(SPEED_HEADERS, rows), "\n", flush=True)


def speed_decode(case: dict[str, Any], ss: SpeedSetup) -> None:
    """One token: the RWKV-7 step from a [dB, H, D, D] fp32 state (fla fused_recurrent, torch step) against
    SDPA of one query over a `cache_len`-token bf16 KV cache."""
    dB, H, D, dev = ss.dB, ss.H, ss.D, ss.device
    x = inputs_rwkv7(dB, 1, H, D, seed=5, state=True, device=dev)
    s0 = x.pop("s0")
    xs = {n: t.to(torch.bfloat16) for n, t in x.items()}
    g = torch.Generator(device=dev).manual_seed(1)
    q = torch.randn(dB, H, 1, D, generator=g, device=dev, dtype=torch.bfloat16)
    kv = [torch.randn(dB, H, ss.cache_len, D, generator=g, device=dev, dtype=torch.bfloat16) for _ in range(2)]

    def step(backend: str) -> Callable[[], Any]:
        def fn() -> Any:
            with torch.no_grad():
                return ops_rwkv7.rwkv7_attention(*(xs[n] for n in OPS[0].args), scale=D**-0.5, initial_state=s0,
                                                 output_final_state=True, backend=backend)
        return fn

    def sdpa() -> torch.Tensor:
        with torch.no_grad(), ss.sdpa_ctx():
            return F.scaled_dot_product_attention(q, *kv)

    case["timings"], rows = {}, []
    methods: dict[str, Callable[[], Any] | str] = {"sdpa_kv_cache": sdpa, "rwkv7_fla_step": ss.no_fla or step("fla"),
                                                  "rwkv7_torch_step": step("torch")}
    time_methods(case, rows, "decode", "1 token", methods, ss.warmup, ss.reps * 4, dev == "cuda")
    state_mib = dB * H * D * D * 4 / 2**20
    cache_mib = 2 * dB * H * ss.cache_len * D * 2 / 2**20
    case["memory_mib"] = {"rwkv7_state_fp32": state_mib, "sdpa_kv_cache_bf16": cache_mib}
    print(md_table(SPEED_HEADERS, rows))
    print(f"\nstate {state_mib:.1f} MiB (fp32) vs KV cache {cache_mib:.1f} MiB (bf16, {ss.cache_len} tokens)\n",
          flush=True)


def section_speed(rep: Report, sec: dict[str, Any], args: argparse.Namespace, device: str) -> None:
    cuda = device == "cuda"
    if not cuda and not args.quick:
        sec["status"] = "skipped"
        sec["reason"] = "CUDA only (run with --quick on a CPU to dry-run the logic at tiny sizes)"
        print(f"skipped: {sec['reason']}")
        return
    if args.quick:
        B, H, D, lengths, torch_at, dB, cache_len = 1, 4, 64, [256, 512], 256, 4, 512
    else:
        B, H, D, lengths, torch_at, dB, cache_len = 1, 32, 128, [2048, 8192, 16384], 2048, 64, 8192
    sdpa_ctx, sdpa_kind = sdpa_context(device)
    ss = SpeedSetup(B=B, H=H, D=D, torch_at=torch_at, dB=dB, cache_len=cache_len,
                    warmup=2 if cuda else 1, reps=5 if cuda else 2, device=device,
                    no_fla=fla_skip_reason(args, device, ops_rwkv7.fla_available), sdpa_ctx=sdpa_ctx)
    sec["config"] = {"train": {"B": B, "H": H, "D": D, "lengths": lengths, "dtype": "bfloat16",
                               "torch_chunked_at": torch_at, "torch_chunked_dtype": "float32",
                               "fwd+bwd": "autograd.grad of every input for a fixed random output gradient"},
                     "decode": {"B": dB, "H": H, "D": D, "state": [dB, H, D, D], "sdpa_cache_len": cache_len,
                                "dtype": "bfloat16 inputs, fp32 state"},
                     "sdpa_backend": sdpa_kind, "warmup": ss.warmup, "reps": ss.reps, "decode_reps": 4 * ss.reps,
                     "device": device, "timer": "cuda events" if cuda else "perf_counter (CPU dry run)"}
    # the smallest length first, then decode, then the long lengths: a spent budget cuts the least useful
    with rep.case(sec, f"T={lengths[0]}", min_left_s=3) as case:
        if case is not None:
            speed_train_prefill(case, ss, lengths[0])
    with rep.case(sec, "decode", min_left_s=2) as case:
        if case is not None:
            speed_decode(case, ss)
    for T in lengths[1:]:
        with rep.case(sec, f"T={T}", min_left_s=3) as case:
            if case is not None:
                speed_train_prefill(case, ss, T)


# ---------------------------------------------------------------------------------------------- env


def section_env(rep: Report, sec: dict[str, Any], args: argparse.Namespace, device: str) -> None:
    def attempt(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__}: {e}"

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(),
                            "float32_matmul_precision": attempt(torch.get_float32_matmul_precision),
                            "cuda_matmul_allow_tf32": attempt(lambda: torch.backends.cuda.matmul.allow_tf32),
                            "autotune_configs_cap": args.autotune_configs, "fake_fla": args.fake_fla,
                            "env": {k: v for k, v in os.environ.items() if k.startswith(("FLA_", "TRITON_"))}}
    for mod in ("triton", "fla", "transformers"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception as e:  # noqa: BLE001
            info[mod] = f"not importable: {type(e).__name__}: {e}"
    if torch.cuda.is_available():
        props = attempt(lambda: torch.cuda.get_device_properties(0))
        if isinstance(props, str):
            info["device"] = props
        else:
            info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                        memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count)
    for mod in ("fla.ops.rwkv7", "fla.ops.rwkv6"):  # the exception text that fla_available() swallows
        try:
            __import__(mod)
            info[f"import {mod}"] = "ok"
        except Exception as e:  # noqa: BLE001
            info[f"import {mod}"] = f"{type(e).__name__}: {e}"
    info["rwkv7 fla_available()"] = ops_rwkv7.fla_available()
    info["rwkv6 fla available (ops_rwkv6._fla())"] = bool(ops_rwkv6._fla())
    info["auto dispatch on this device"] = "fla" if device == "cuda" and ops_rwkv7.fla_available() else "torch"
    sec["info"] = info
    print(md_table(["key", "value"], [[k, v] for k, v in info.items()]), flush=True)


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file (written after every case)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU dry run takes well under a minute)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--budget-s", type=float, default=85.0,
                   help="seconds, split between the sections: cases start only before their section's share "
                        "ends (default 85)")
    p.add_argument("--ref-max-t", type=int, default=1000,
                   help="longest T for the float64 reference loop on CUDA (default 1000)")
    p.add_argument("--autotune-configs", type=int, default=None,
                   help="keep only the first N configs of each Triton autotune (faster compile, slower kernels)")
    p.add_argument("--fake-fla", action="store_true",
                   help="self-test on a CPU: PyTorch forms stand in for fla so the fla branches run (numbers moot)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the CPU parts (default: torch's on a GPU machine, 1 without)")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # a CPU-only machine here is shared: several threads fighting other jobs run 10-50x slower than one
    threads = args.threads or (None if device == "cuda" else 1)
    if threads:
        torch.set_num_threads(threads)
    torch.set_float32_matmul_precision("highest")  # the fp32 torch reference on CUDA must not use TF32
    rep = Report(args.json, args.budget_s, {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv[1:],
        "quick": args.quick, "device": device, "dry_run": device != "cuda"})
    if OPS_IMPORT_ERROR:
        rep.data["qwerky_import_error"] = OPS_IMPORT_ERROR
        print(f"**qwerky failed to import; ops loaded from their files**\n```\n{OPS_IMPORT_ERROR}```")
    record_warnings(rep.data["warnings"])
    faulthandler.dump_traceback_later(args.budget_s + 120, exit=False)  # stack dump if something hangs
    print(f"# gpu_check ({'quick, ' if args.quick else ''}device {device}, budget {args.budget_s:.0f} s)")
    if device != "cuda":
        print("\nno CUDA device: CUDA-only parts are skipped, the rest runs on the CPU as a dry run")
    if args.fake_fla:
        install_fake_fla()
        rep.data["fake_fla"] = True
        print("\n**--fake-fla: the PyTorch forms stand in for fla; every 'fla' number below is meaningless**")
    if args.autotune_configs:
        try:
            limit_triton_autotune(args.autotune_configs)
        except Exception:  # noqa: BLE001
            rep.data["autotune_cap_error"] = traceback.format_exc()
    rep.save()

    runners = {"env": section_env, "kernels": section_kernels, "model": section_model, "speed": section_speed}
    selected = [n for n in SECTIONS if n in args.sections]
    total_share = sum(BUDGET_SHARE[n] for n in selected) or 1.0
    share = 0.0
    for name in selected:
        share += BUDGET_SHARE[name]
        deadline = share / total_share * args.budget_s if BUDGET_SHARE[name] else args.budget_s  # env: no cases
        with rep.section(name, deadline_s=deadline) as sec:
            runners[name](rep, sec, args, device)
    faulthandler.cancel_dump_traceback_later()
    rep.data["finished"] = True
    rep.save()
    statuses = {n: s["status"] for n, s in rep.data["sections"].items()}
    print(f"\n## summary\n\n{statuses}; {rep.elapsed():.1f} s; {len(rep.data['warnings'])} distinct warnings; "
          f"wrote {args.json}")
    return rep.data


if __name__ == "__main__":
    main()
