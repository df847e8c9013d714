"""Fixtures of the op suite: one `spec` per registered op, one thread, NaN-filled torch.empty, CUDA devices.

Each fla test runs twice: on CUDA against fla's kernels (marked `cuda`, skipped with the reason where there is
no GPU or fla), and on the CPU with the PyTorch forms standing in for fla under fla's signatures ("fake"): the
tests' own logic stays checked between GPU loans. QWERKY_AUTOTUNE_CAP=N keeps N configs per Triton autotune:
fla compiles for minutes otherwise, which a short GPU loan cannot afford.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from qwerky.opspecs import OpSpec, all_op_specs, limit_triton_autotune

if os.environ.get("QWERKY_AUTOTUNE_CAP"):
    limit_triton_autotune(int(os.environ["QWERKY_AUTOTUNE_CAP"]))  # before anything imports fla

SPECS = all_op_specs()


@pytest.fixture(params=SPECS, ids=[s.name for s in SPECS])
def spec(request: pytest.FixtureRequest) -> OpSpec:
    """Every test of the suite runs once per registered op."""
    return request.param


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These ops are small: one thread is faster than two fighting over a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def nan_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.empty / empty_like / new_empty return NaN-filled memory, so uninitialised reads show."""
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def _nan(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _nan(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _nan(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _nan(real_new_empty(self, *a, **k)))


def fake_fla(spec: OpSpec) -> dict[str, Callable[..., Any]]:
    """The PyTorch forms behind fla's names and signature (chunk for training/prefill, recurrent for decode)."""
    def behind(fn: Callable[..., Any]) -> Callable[..., Any]:
        def kernel(*tensors: torch.Tensor, scale: float = 1.0, initial_state: torch.Tensor | None = None,
                   output_final_state: bool = False, **_: Any) -> Any:
            return fn(*tensors, scale=scale, initial_state=initial_state, output_final_state=output_final_state)
        return kernel

    return {"chunk": behind(spec.chunk), "recurrent": behind(spec.naive)}


@contextlib.contextmanager
def full_fp32_matmuls() -> Iterator[None]:
    """The fp32 torch references must not use TF32."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)


@pytest.fixture
def cuda_device() -> Iterator[str]:
    """"cuda", or a skip saying there is none."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    with full_fp32_matmuls():
        yield "cuda"


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.cuda), "fake"])
def fla_device(request: pytest.FixtureRequest, spec: OpSpec, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The device of the op's fla kernels: "cuda" (skips, saying why, without CUDA or fla), or "cpu" with the
    PyTorch forms installed as a fake fla."""
    if request.param == "fake":
        monkeypatch.setattr(spec.module, "_FLA", fake_fla(spec))
        yield "cpu"
        return
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not spec.module.fla_available():
        pytest.skip(f"{spec.name}: flash-linear-attention's kernels do not import "
                    f"({spec.module.__name__}.fla_available() is False; pip install 'qwerky[gpu]')")
    with full_fp32_matmuls():
        yield "cuda"
