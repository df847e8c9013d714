"""Every registered op (`qwerky.opspecs.all_op_specs()`): naive == chunked == step, dispatch, argument checks,
and on CUDA fla's Triton kernels against the PyTorch forms.

One suite for all ops, as in flash-linear-attention's tests: an op declares its forms and input generator once
(`OpSpec`) and every test here runs for every op (test ids carry the op's name). Comparisons are fp32 against
fp32, relative to the reference's largest entry (max |x - y| / max |y|), for the output, the final state and the
gradient of every input and of the initial state, under a fixed random loss that reads output and final state.
The fla tests use fla's relative RMS error; each runs on CUDA (marked `cuda`: skipped, saying why, without CUDA
or fla) and on the CPU against a fake fla made of the PyTorch forms, which keeps their logic checked in CI.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any

import pytest
import torch

from qwerky.opspecs import OpSpec

Tensors = dict[str, torch.Tensor]
Result = tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]
FORMS = ("naive", "chunk", "step", "dispatch")
CUDA_LENGTHS = (1, 63, 200, 1000, 4096)
BF16_TOL_FACTOR = 4  # fla in bf16 against torch in fp32: measured 2-3x the fp32 (TF32) error on an H100


# ---------------------------------------------------------------------------------------------- helpers


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| (0 when both are exactly zero); NaN anywhere gives inf."""
    x, ref = x.detach().float().cpu(), ref.detach().float().cpu()
    if not (torch.isfinite(x).all() and torch.isfinite(ref).all()):
        return float("inf")
    den = ref.abs().max().item()
    num = (x - ref).abs().max().item()
    return num / den if den > 0 else num


def rms_rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| (fla's own measure: its kernels use TF32); NaN anywhere gives inf."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if not (torch.isfinite(x).all() and torch.isfinite(ref).all()):
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def nan_padded(x: torch.Tensor) -> torch.Tensor:
    """`x` as a non-contiguous view into a larger NaN-filled buffer: an op that reads past the view's extent
    (wrong strides, an off-by-one along any axis) picks up NaN and the comparison fails."""
    buf = torch.full([d + 3 for d in x.shape], float("nan"), dtype=x.dtype, device=x.device)
    index = tuple(slice(1, d + 1) for d in x.shape)
    buf[index] = x
    return buf[index]


def inputs(spec: OpSpec, B: int, T: int, H: int, K: int, V: int | None = None, **kw: Any) -> Tensors:
    """The op's own generator: ranges like its mixer's, so the tolerances mean what they say."""
    return spec.make_inputs(B, T, H, K, K if V is None else V, **kw)


def names(spec: OpSpec, x: Tensors) -> list[str]:
    """The differentiable leaves of `x`: every tensor input, and the initial state when there is one."""
    return [n for n in (*spec.tensor_names, "s0") if n in x]


def sliced(spec: OpSpec, x: Tensors, time: slice) -> list[torch.Tensor]:
    """The positional tensors with `time` taken along T (tensors without a time axis whole)."""
    return [x[n][:, time] if n in spec.time_tensors else x[n] for n in spec.tensor_names]


def length(spec: OpSpec, x: Tensors) -> int:
    """T, read off a time tensor (an op may have inputs without a time axis)."""
    return x[spec.time_tensors[0]].shape[1]


def zero_state(spec: OpSpec, x: Tensors) -> torch.Tensor:
    """A zero state of the op's shape, found by running one token (V is not known to the suite)."""
    with torch.no_grad():
        _, s = spec.naive(*sliced(spec, x, slice(0, 1)), output_final_state=True)
    return torch.zeros_like(s)


def stepwise(spec: OpSpec, x: Tensors, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One token at a time through the decode step, carrying the state."""
    S = x["s0"] if "s0" in x else zero_state(spec, x)
    outs = []
    for t in range(length(spec, x)):
        o, S = spec.step(*sliced(spec, x, slice(t, t + 1)), state=S, scale=scale)
        outs.append(o)
    return torch.cat(outs, dim=1), S


def run(spec: OpSpec, form: str, x: Tensors, scale: float = 1.0, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, final state) of one form; "chunk_nan" is the chunked form on NaN-padded strided views."""
    if form == "step":
        return stepwise(spec, x, scale)
    args = [x[n] for n in spec.tensor_names]
    if form == "chunk_nan":
        form, args = "chunk", [nan_padded(t) for t in args]
    fn = getattr(spec, form)
    return fn(*args, scale=scale, initial_state=x.get("s0"), output_final_state=True, **kw)


def loss_of(o: torch.Tensor, s: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """A fixed random projection of the output and the final state (drawn on the CPU: same on every device)."""
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(o.shape, generator=g).to(o.device)
    gs = torch.randn(s.shape, generator=g).to(s.device)
    return (o.float() * go).sum() + (s.float() * gs).sum()


def with_grads(spec: OpSpec, x: Tensors, o: torch.Tensor, s: torch.Tensor) -> Result:
    """(o, state, gradient of every leaf of `x`): the loss reads both, so both backward paths are checked."""
    grads = torch.autograd.grad(loss_of(o, s), [x[n] for n in names(spec, x)])
    return o.detach(), s.detach(), grads


def outputs_and_grads(spec: OpSpec, form: str, x: Tensors, **kw: Any) -> Result:
    return with_grads(spec, x, *run(spec, form, x, **kw))


def errors(spec: OpSpec, x: Tensors, got: Result, ref: Result,
           measure: Callable[[torch.Tensor, torch.Tensor], float] = rel_err) -> dict[str, float]:
    errs = {"o": measure(got[0], ref[0]), "state": measure(got[1], ref[1])}
    errs.update({f"d{n}": measure(a, b) for n, a, b in zip(names(spec, x), got[2], ref[2])})
    return errs


def assert_same(spec: OpSpec, x: Tensors, got: Result, ref: Result, tol: float | None = None,
                measure: Callable[[torch.Tensor, torch.Tensor], float] = rel_err, what: str = "",
                record: Callable[[str, object], None] | None = None) -> None:
    """Every error within `tol`; `record` (pytest's record_property) keeps them in the junit XML of a GPU run."""
    tol = spec.tol if tol is None else tol
    errs = errors(spec, x, got, ref, measure)
    if record is not None:
        record(what or "errors", json.dumps(errs))
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"{spec.name} {what}: errors above {tol}: {bad} (all: {errs})"


def module_name_of(spec: OpSpec, fn: Callable[..., Any]) -> str:
    """The name under which the ops module holds `fn` (the dispatch looks its forms up there)."""
    found = [n for n, v in vars(spec.module).items() if v is fn]
    assert found, f"{spec.name}: {fn.__name__} must be a function of {spec.module.__name__} (the dispatch calls it)"
    return found[0]


# ---------------------------------------------------------------------------------------------- the forms agree


@pytest.mark.parametrize(("T", "K", "V"), [(63, 16, 16), (65, 16, 16), (100, 60, 60), (1, 60, 60), (64, 16, 32),
                                           (33, 16, 32), (130, 16, 16)])
def test_chunk_naive_step_agree(spec: OpSpec, T: int, K: int, V: int, nan_empty: None) -> None:
    x = inputs(spec, 2, T, 2, K, V, seed=T + K)
    ref = outputs_and_grads(spec, "naive", x)
    assert_same(spec, x, outputs_and_grads(spec, "chunk_nan", x), ref, what="chunk on NaN-padded views")
    assert_same(spec, x, outputs_and_grads(spec, "step", x), ref, what="step")


@pytest.mark.parametrize("decay", ["slowest", "fastest"])
def test_decay_at_bounds(spec: OpSpec, decay: str) -> None:
    x = inputs(spec, 1, 100, 2, 16, decay=decay, seed=3)
    ref = outputs_and_grads(spec, "naive", x)
    assert_same(spec, x, outputs_and_grads(spec, "chunk", x), ref, what=f"chunk, decay {decay}")
    assert_same(spec, x, outputs_and_grads(spec, "step", x), ref, what=f"step, decay {decay}")


def test_chunk_sizes(spec: OpSpec) -> None:
    x = inputs(spec, 1, 77, 2, 16, seed=4)
    ref = outputs_and_grads(spec, "naive", x)
    for C in spec.chunk_sizes:
        assert_same(spec, x, outputs_and_grads(spec, "chunk", x, chunk_size=C), ref, what=f"chunk_size {C}")


def test_zero_initial_state_and_scale(spec: OpSpec) -> None:
    x = inputs(spec, 2, 70, 2, 16, seed=5, state=False)
    ref = outputs_and_grads(spec, "naive", x, scale=0.25)
    assert_same(spec, x, outputs_and_grads(spec, "chunk", x, scale=0.25), ref, what="chunk, no initial state")
    assert_same(spec, x, with_grads(spec, x, *stepwise(spec, x, scale=0.25)), ref, what="step from zeros")
    o1, _ = run(spec, "naive", x)
    assert rel_err(ref[0], 0.25 * o1.detach()) <= spec.tol


def test_two_pieces_equal_one(spec: OpSpec) -> None:
    """Prefill in two pieces (state carried), and prefill then token-by-token decode (the serving path), give
    the one-piece outputs, final state and gradients (through the carried state too)."""
    x = inputs(spec, 2, 150, 2, 16, seed=6)
    ref = outputs_and_grads(spec, "naive", x)
    cut = 57  # neither piece a multiple of any chunk size
    first = dict(zip(spec.tensor_names, sliced(spec, x, slice(None, cut))))
    second = dict(zip(spec.tensor_names, sliced(spec, x, slice(cut, None))))
    for form in ("chunk", "step"):
        o1, s1 = run(spec, "chunk", {**first, "s0": x["s0"]})
        o2, s2 = run(spec, form, {**second, "s0": s1})
        assert_same(spec, x, with_grads(spec, x, torch.cat([o1, o2], 1), s2), ref, what=f"chunk then {form}")


def test_output_final_state_false_and_dtypes(spec: OpSpec) -> None:
    """bf16 inputs give bf16 outputs and an fp32 state; output_final_state=False gives no state."""
    B, T, H, K, V = 1, 20, 2, 16, 8
    x = {n: t.detach().to(torch.bfloat16) for n, t in inputs(spec, B, T, H, K, V, seed=7, state=False).items()}
    args = [x[n] for n in spec.tensor_names]
    forms: dict[str, Callable[..., Any]] = {"naive": spec.naive, "chunk": spec.chunk,
                                            "dispatch": lambda *a, **k: spec.dispatch(*a, backend="torch", **k)}
    for form, fn in forms.items():
        o, s = fn(*args, output_final_state=False)
        assert s is None and o.dtype == torch.bfloat16 and o.shape == (B, T, H, V), form
        o, s = fn(*args, output_final_state=True)
        assert s.dtype == torch.float32 and s.shape == (B, H, K, V), form
    o, s = spec.step(*sliced(spec, x, slice(0, 1)), state=torch.zeros(B, H, K, V))
    assert o.dtype == torch.bfloat16 and o.shape == (B, 1, H, V) and s.dtype == torch.float32


def test_torch_forms_ignore_bf16_autocast(spec: OpSpec) -> None:
    """Training without fla under bf16 autocast: the PyTorch forms still compute in fp32 (RWKV-7's
    triangular_solve has no bf16 kernel, and the state recursion needs the precision)."""
    x = inputs(spec, 1, 100, 2, 16, seed=3)
    for T in (100, 1):
        args = sliced(spec, x, slice(0, T))
        o_ref, s_ref = spec.dispatch(*args, initial_state=x["s0"], output_final_state=True, backend="torch")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o, s = spec.dispatch(*args, initial_state=x["s0"], output_final_state=True, backend="torch")
        assert o.dtype == torch.float32, T
        torch.testing.assert_close(o, o_ref)
        torch.testing.assert_close(s, s_ref)


# ---------------------------------------------------------------------------------------------- dispatch


def test_dispatch_uses_torch_forms_on_cpu(spec: OpSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors never reach fla (even "installed"): chunked for T > 1, a recurrent form for T == 1."""
    calls: list[str] = []

    def recording(form: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            calls.append(form)
            return fn(*a, **k)
        return wrapper

    for form in ("chunk", "naive", "step"):
        fn = getattr(spec, form)
        monkeypatch.setattr(spec.module, module_name_of(spec, fn), recording(form, fn))

    def no_fla(*a: Any, **k: Any) -> Any:
        raise AssertionError("fla must not be used for CPU tensors")

    monkeypatch.setattr(spec.module, "_FLA", {"chunk": no_fla, "recurrent": no_fla})
    x = inputs(spec, 1, 40, 2, 16, seed=8)
    args, s0 = [x[n] for n in spec.tensor_names], x["s0"]
    o, s = spec.dispatch(*args, initial_state=s0, output_final_state=True)
    assert calls == ["chunk"]
    o_ref, s_ref = spec.naive(*args, initial_state=s0, output_final_state=True)
    assert rel_err(o, o_ref) <= spec.tol and rel_err(s, s_ref) <= spec.tol
    for T, backend, expect_chunk in ((1, "auto", False), (40, "naive", False), (40, "torch", True)):
        calls.clear()
        spec.dispatch(*sliced(spec, x, slice(0, T)), initial_state=s0, output_final_state=True, backend=backend)
        assert calls == ["chunk"] if expect_chunk else (calls and "chunk" not in calls), (T, backend, calls)


def test_dispatch_passes_fla_argument_order(spec: OpSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    """backend='fla' calls fla's kernels as fla declares them, (*tensor_names, scale, initial_state,
    output_final_state): a fake with those parameters must see the right tensors. The chunk kernel serves
    training and prefill, the recurrent one no-grad single-token decode."""
    P = inspect.Parameter
    signature = inspect.Signature([P(n, P.POSITIONAL_OR_KEYWORD) for n in spec.tensor_names] + [
        P("scale", P.POSITIONAL_OR_KEYWORD, default=None), P("initial_state", P.POSITIONAL_OR_KEYWORD, default=None),
        P("output_final_state", P.POSITIONAL_OR_KEYWORD, default=False), P("kwargs", P.VAR_KEYWORD)])
    seen: list[tuple[str, dict[str, Any]]] = []

    def fake(kind: str) -> Callable[..., Any]:
        def kernel(*a: Any, **k: Any) -> Any:
            bound = signature.bind(*a, **k).arguments  # TypeError when the call does not fit fla's signature
            seen.append((kind, bound))
            return spec.naive(*(bound[n] for n in spec.tensor_names), scale=bound["scale"],
                              initial_state=bound["initial_state"], output_final_state=bound["output_final_state"])
        return kernel

    monkeypatch.setattr(spec.module, "_FLA", {"chunk": fake("chunk"), "recurrent": fake("recurrent")})
    x = inputs(spec, 1, 10, 2, 16, seed=9)
    args, s0 = [x[n] for n in spec.tensor_names], x["s0"]
    o, s = spec.dispatch(*args, scale=0.5, initial_state=s0, output_final_state=True, backend="fla")
    assert [kind for kind, _ in seen] == ["chunk"]
    bound = seen[0][1]
    for n, t in zip(spec.tensor_names, args):
        assert torch.equal(bound[n], t), f"{spec.name}: fla's {n} got another tensor"
    assert bound["scale"] == 0.5 and torch.equal(bound["initial_state"], s0)
    o_ref, s_ref = spec.naive(*args, scale=0.5, initial_state=s0, output_final_state=True)
    assert rel_err(o, o_ref) <= spec.tol and rel_err(s, s_ref) <= spec.tol
    with torch.no_grad():
        spec.dispatch(*sliced(spec, x, slice(0, 1)), scale=0.5, initial_state=s0, output_final_state=True,
                      backend="fla")
    assert seen[-1][0] == "recurrent"


def test_fla_backend_without_fla_raises(spec: OpSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spec.module, "_FLA", {})  # as when the import failed
    assert not spec.module.fla_available()
    x = inputs(spec, 1, 8, 2, 16, seed=10)
    with pytest.raises(RuntimeError, match="needs flash-linear-attention"):  # says how to get it
        spec.dispatch(*(x[n] for n in spec.tensor_names), backend="fla")


def test_qwerky_kernels_env_selects_backend(spec: OpSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    """QWERKY_KERNELS overrides the automatic choice (e.g. =torch while Triton cannot compile)."""
    x = inputs(spec, 1, 20, 2, 8, seed=4)
    args = [x[n] for n in spec.tensor_names]
    monkeypatch.setattr(spec.module, "_FLA", {})  # fla not importable
    monkeypatch.setenv("QWERKY_KERNELS", "fla")
    with pytest.raises(RuntimeError, match="needs flash-linear-attention"):
        spec.dispatch(*args)
    monkeypatch.setenv("QWERKY_KERNELS", "torch")
    o, _ = spec.dispatch(*args)
    torch.testing.assert_close(o, spec.dispatch(*args, backend="torch")[0])


# ---------------------------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("form", FORMS)
def test_bad_shapes_raise_value_error(spec: OpSpec, form: str) -> None:
    """Each input with a wrong batch-free rank, T, H or K (and a wrong initial state) is a ValueError."""
    B, H, K, V = 2, 2, 16, 8
    T = 1 if form == "step" else 9
    x = {n: t.detach() for n, t in inputs(spec, B, T, H, K, V, seed=11).items()}

    def call(tensors: list[torch.Tensor], state: torch.Tensor = x["s0"]) -> Any:
        if form == "step":
            return spec.step(*tensors, state=state)
        return getattr(spec, form)(*tensors, initial_state=state)

    good = [x[n] for n in spec.tensor_names]
    call(good)
    bad_inputs = {"no batch axis": [t[0] if n in spec.time_tensors else t for n, t in zip(spec.tensor_names, good)]}
    for i, (n, t) in enumerate(zip(spec.tensor_names, good)):
        if n in spec.time_tensors:
            wrong = {"T": torch.cat([t, t], 1), "H": t[:, :, :1]}
        else:
            wrong = {"H": t[:1], "rank": t[None]}
        if t.shape[-1] == K and not (n in spec.time_tensors and t.dim() < 4):
            wrong["K"] = t[..., : K // 2]
        for what, value in wrong.items():
            bad_inputs[f"{n}: wrong {what} {tuple(value.shape)}"] = [*good[:i], value, *good[i + 1:]]
    for what, tensors in bad_inputs.items():
        with pytest.raises(ValueError):
            call(tensors)
            pytest.fail(f"{spec.name} {form}: no ValueError for {what}")
    for state in (x["s0"][..., : V // 2], x["s0"][:1]):
        with pytest.raises(ValueError):
            call(good, state)
            pytest.fail(f"{spec.name} {form}: no ValueError for an initial state of shape {tuple(state.shape)}")


# ---------------------------------------------------------------------------------------------- CUDA


def to_device(x: Tensors, device: str, dtype: torch.dtype = torch.float32) -> Tensors:
    """Leaves on `device`: inputs in `dtype`, the state in fp32 (fla's convention)."""
    return {n: t.detach().to(device=device, dtype=torch.float32 if n == "s0" else dtype).requires_grad_(True)
            for n, t in x.items()}


def fla_run(spec: OpSpec, x: Tensors, backend: str) -> Result:
    """Through the dispatch, as the mixers call it (scale 1/sqrt(64))."""
    args = [x[n] for n in spec.tensor_names]
    o, s = spec.dispatch(*args, scale=0.125, initial_state=x.get("s0"), output_final_state=True, backend=backend)
    return with_grads(spec, x, o, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", CUDA_LENGTHS)
def test_fla_matches_torch_cuda(spec: OpSpec, fla_device: str, T: int, dtype: torch.dtype,
                                record_property: Callable[[str, object], None]) -> None:
    """fla's chunk kernel (training, prefill) against the chunked PyTorch form in fp32 on the same device, from a
    non-zero state: output, final state, every gradient. Errors must not grow with T."""
    if fla_device == "cpu" and T > 200:
        pytest.skip("fake fla: long sequences only against the real kernels")
    x = inputs(spec, 2, T, 4, 64, seed=T)
    ref = fla_run(spec, to_device(x, fla_device), "torch")
    x_fla = to_device(x, fla_device, dtype)
    tol = spec.fla_tol * (BF16_TOL_FACTOR if dtype == torch.bfloat16 else 1)
    assert_same(spec, x_fla, fla_run(spec, x_fla, "fla"), ref, tol, rms_rel, f"fla {dtype} T={T}", record_property)


def test_fla_noncontiguous_inputs_and_no_state(spec: OpSpec, fla_device: str,
                                               record_property: Callable[[str, object], None]) -> None:
    """Inputs laid out [B, H, T, D] in memory (what transposes give) and no initial state: same as torch."""
    x = inputs(spec, 2, 200, 4, 64, seed=7, state=False)
    ref = fla_run(spec, to_device(x, fla_device), "torch")
    xs = to_device(x, fla_device)
    views = {n: (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
                 if n in spec.time_tensors and t.dim() == 4 else t) for n, t in xs.items()}
    assert not all(t.is_contiguous() for t in views.values())
    assert_same(spec, views, fla_run(spec, views, "fla"), ref, spec.fla_tol, rms_rel, "fla, strided, no state",
                record_property)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fla_decode_steps(spec: OpSpec, fla_device: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """No-grad single tokens from a non-zero state go to fla's recurrent kernel (auto dispatch on CUDA): one step
    against the PyTorch step, and 16 chained steps against the chunked form over the same tokens."""
    calls: list[int] = []
    recurrent = spec.module._FLA["recurrent"]

    def counting(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return recurrent(*a, **k)

    monkeypatch.setitem(spec.module._FLA, "recurrent", counting)
    steps = 16
    x = {n: t.detach() for n, t in to_device(inputs(spec, 2, steps, 4, 64, seed=99), fla_device, dtype).items()}
    tol = spec.fla_tol * (BF16_TOL_FACTOR if dtype == torch.bfloat16 else 1)
    with torch.no_grad():
        backend = "fla" if fla_device == "cpu" else "auto"  # on a CPU (fake fla) auto never picks fla
        o1, s1 = spec.dispatch(*sliced(spec, x, slice(0, 1)), initial_state=x["s0"], output_final_state=True,
                               backend=backend)
        o1_ref, s1_ref = spec.step(*(t.float() for t in sliced(spec, x, slice(0, 1))), state=x["s0"])
        assert calls, f"{spec.name}: a no-grad single token did not use fla's recurrent kernel"
        assert rms_rel(o1, o1_ref) <= tol and rms_rel(s1, s1_ref) <= tol, (rms_rel(o1, o1_ref), rms_rel(s1, s1_ref))
        S, outs = x["s0"], []
        for t in range(steps):
            o, S = spec.dispatch(*sliced(spec, x, slice(t, t + 1)), initial_state=S, output_final_state=True,
                                 backend="fla")
            outs.append(o)
        o_ref, s_ref = spec.chunk(*(t.float() for t in sliced(spec, x, slice(None))), initial_state=x["s0"],
                                  output_final_state=True)
        o_all = torch.cat(outs, 1)
        assert rms_rel(o_all, o_ref) <= tol and rms_rel(S, s_ref) <= tol, (rms_rel(o_all, o_ref), rms_rel(S, s_ref))
    assert len(calls) == 1 + steps


@pytest.mark.cuda
def test_torch_forms_on_cuda_match_cpu(spec: OpSpec, cuda_device: str) -> None:
    """The PyTorch forms on CUDA (a GPU without fla trains with them) against the CPU reference: outputs, state
    and every gradient to the CPU tolerance (no TF32)."""
    x = inputs(spec, 2, 200, 4, 64, seed=5)
    ref = outputs_and_grads(spec, "naive", x)
    xd = to_device(x, cuda_device)
    assert_same(spec, xd, outputs_and_grads(spec, "chunk", xd), ref, what=f"chunk on {cuda_device}")
    xs = {n: t[:, :1] if n in spec.time_tensors else t for n, t in to_device(x, cuda_device).items()}
    o, s = spec.dispatch(*(xs[n] for n in spec.tensor_names), initial_state=xs["s0"], output_final_state=True,
                         backend="torch")
    o_ref, s_ref = spec.naive(*sliced(spec, x, slice(0, 1)), initial_state=x["s0"], output_final_state=True)
    assert rel_err(o, o_ref) <= spec.tol and rel_err(s, s_ref) <= spec.tol
