"""The registry of qwerky's sequence-mixing ops: every op declares its forms once, here.

Why: each recurrence (RWKV-7, RWKV-6, ...) exists in several forms that must agree - a per-token
reference, a chunked parallel form for training and prefill, a one-token decode step, flash-linear-attention's
Triton kernels on CUDA - and a dispatch that picks one. As in flash-linear-attention, the fast forms sit beside
their reference and one test suite checks them all against it. An op is one file in this package holding a
module-level `SPEC = OpSpec(...)` (the forms themselves stay in `qwerky.modeling.ops_*`, which exported model
folders copy); `all_op_specs()` finds it, and `tests/kernels/test_ops.py` (outputs, states, every gradient,
dispatch, CUDA parity) and `benchmarks/kernel_speed.py` iterate the registry. A new op needs nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

__all__ = ["OpSpec", "all_op_specs", "limit_triton_autotune"]


@dataclass(frozen=True)
class OpSpec:
    """One op's forms and input generator (all forms return `(o, final_state)`; states are fp32 [B, H, K, V]).

    make_inputs(B, T, H, K, V, *, decay="random"|"slowest"|"fastest", seed=0, state=True, device="cpu")
    returns fp32 leaves (requires_grad=True) built like the mixer builds them, plus "s0" [B, H, K, V] when
    state=True; "slowest" means no decay, "fastest" the op's lowest supported log-decay.
    """

    name: str  # "rwkv7"
    tensor_names: tuple[str, ...]  # positional tensor inputs of every form, in order (== fla's order)
    time_tensors: tuple[str, ...]  # those with a time axis at dim 1 (rwkv6's u [H, K] has none)
    make_inputs: Callable[..., dict[str, torch.Tensor]]
    naive: Callable[..., Any]  # (*tensors, scale=, initial_state=, output_final_state=) -> (o, S)
    chunk: Callable[..., Any]  # same signature (+ optional chunk_size kw)
    step: Callable[..., Any]  # (*tensors, state=, scale=) -> (o, S)
    dispatch: Callable[..., Any]  # (*tensors, scale=, initial_state=, output_final_state=, backend=) -> (o, S)
    module: ModuleType  # the ops module (holds `_FLA` and `fla_available()`; tests monkeypatch `_FLA`)
    tol: float = 1e-4
    fla_tol: float = 5e-3  # fla vs torch on CUDA fp32 (Triton uses TF32)
    chunk_sizes: tuple[int, ...] = (16, 32, 64)


def all_op_specs() -> list[OpSpec]:
    """The `SPEC` of every module of this package, sorted by name (an import error in one is raised, not hidden)."""
    specs = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        spec = getattr(importlib.import_module(f"{__name__}.{info.name}"), "SPEC", None)
        if isinstance(spec, OpSpec):
            specs.append(spec)
    return sorted(specs, key=lambda s: s.name)


_AUTOTUNE_CAP: int | None = None


def limit_triton_autotune(n: int) -> None:
    """Keep only the first `n` configs of every `@triton.autotune` defined from now on (call before fla imports).

    A borrowed GPU comes for minutes and fla's kernels autotune for minutes on first use: this trades kernel
    speed for compile time (timings then understate fla). Idempotent; a no-op without triton.
    """
    global _AUTOTUNE_CAP
    try:
        import triton  # type: ignore[import-not-found]
    except ImportError:
        return
    if _AUTOTUNE_CAP is not None:
        _AUTOTUNE_CAP = n
        return
    _AUTOTUNE_CAP = n
    real = triton.autotune

    def autotune(*args: Any, **kwargs: Any) -> Any:
        cap = _AUTOTUNE_CAP or n
        if args:
            args = (list(args[0])[:cap], *args[1:])
        elif "configs" in kwargs:
            kwargs["configs"] = list(kwargs["configs"])[:cap]
        return real(*args, **kwargs)

    triton.autotune = autotune
