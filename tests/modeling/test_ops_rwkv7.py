"""RWKV-7 recurrence: chunked == naive == token-by-token step, outputs, final state and gradients.

The ops compute in fp32 whatever the input dtype, so comparisons are fp32 against fp32 with a
relative tolerance (max |x - y| / max |y|). Inputs are built like RAD-RWKV7's: a = -kappa,
b = kappa * iclr with kappa L2-normalised per head and iclr in (0, 1); log-decay in [-exp(-0.5), 0].
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qwerky.modeling import ops_rwkv7
from qwerky.modeling.ops_rwkv7 import (
    chunk_rwkv7_torch,
    fla_available,
    naive_recurrent_rwkv7,
    recurrent_step_rwkv7,
    rwkv7_attention,
)

W_MIN = -math.exp(-0.5)  # RAD-RWKV7's lowest log-decay, -0.6065
TOL = 1e-4
NAMES = ("r", "w", "k", "v", "a", "b")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| (0 when both are exactly zero); NaN anywhere gives inf."""
    if not (torch.isfinite(x).all() and torch.isfinite(ref).all()):
        return float("inf")
    den = ref.abs().max().item()
    num = (x - ref).abs().max().item()
    return num / den if den > 0 else num


def nan_padded(x: torch.Tensor) -> torch.Tensor:
    """`x` as a non-contiguous view into a larger NaN-filled buffer: an op that reads past the view's
    extent (wrong strides, an off-by-one along T or D) picks up NaN and the comparison fails."""
    B, T, H, D = x.shape
    buf = torch.full((B, T + 3, H + 1, D + 5), float("nan"), dtype=x.dtype)
    buf[:, 1:T + 1, :H, 2:D + 2] = x
    return buf[:, 1:T + 1, :H, 2:D + 2]


def make_inputs(B: int, T: int, H: int, K: int, V: int | None = None, *, decay: str | float = "random",
                seed: int = 0, state: bool = True) -> dict[str, torch.Tensor]:
    """RAD-RWKV7-like inputs (fp32 leaves) and a non-zero initial state `s0`."""
    V = K if V is None else V
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    kappa = F.normalize(rnd(B, T, H, K), dim=-1)
    iclr = torch.sigmoid(rnd(B, T, H, K))
    if decay == "random":
        w = W_MIN * torch.sigmoid(rnd(B, T, H, K))
    else:
        w = torch.full((B, T, H, K), float(decay))
    x = {"r": rnd(B, T, H, K) * K**-0.5, "w": w, "k": rnd(B, T, H, K) * K**-0.5, "v": rnd(B, T, H, V),
         "a": -kappa, "b": kappa * iclr}
    if state:
        x["s0"] = rnd(B, H, K, V) * 0.5
    return {n: t.requires_grad_(True) for n, t in x.items()}


def leaves(x: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [x[n] for n in (*NAMES, "s0") if n in x]


def run_stepwise(x: dict[str, torch.Tensor], scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Feeds one token at a time through `recurrent_step_rwkv7`, carrying the state."""
    B, T, H, K = x["r"].shape
    S = x.get("s0")
    if S is None:
        S = torch.zeros(B, H, K, x["v"].shape[-1])
    outs = []
    for t in range(T):
        o, S = recurrent_step_rwkv7(*(x[n][:, t:t + 1] for n in NAMES), state=S, scale=scale)
        outs.append(o)
    return torch.cat(outs, dim=1), S


def run(form: str, x: dict[str, torch.Tensor], scale: float = 1.0, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    args = [x[n] for n in NAMES]
    if form == "naive":
        return naive_recurrent_rwkv7(*args, scale=scale, initial_state=x.get("s0"), **kw)
    if form == "chunk":
        return chunk_rwkv7_torch(*args, scale=scale, initial_state=x.get("s0"), **kw)
    if form == "chunk_nan":  # same, with every input a strided view into NaN-filled memory
        return chunk_rwkv7_torch(*(nan_padded(t) for t in args), scale=scale, initial_state=x.get("s0"), **kw)
    if form == "step":
        return run_stepwise(x, scale)
    raise ValueError(form)


def outputs_and_grads(form: str, x: dict[str, torch.Tensor], seed: int = 1, **kw):
    """(o, final state, grads of every leaf) for a fixed random loss touching o and the final state."""
    o, s = run(form, x, **kw)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(o.shape, generator=g)
    gs = torch.randn(s.shape, generator=g)
    loss = (o * go).sum() + (s * gs).sum()
    grads = torch.autograd.grad(loss, leaves(x))
    return o.detach(), s.detach(), grads


def assert_same(got, ref, names, tol=TOL):
    o1, s1, g1 = got
    o2, s2, g2 = ref
    errs = {"o": rel_err(o1, o2), "state": rel_err(s1, s2)}
    errs.update({f"d{n}": rel_err(a, b) for n, a, b in zip(names, g1, g2)})
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These ops are small: one thread is faster than two fighting over a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty / empty_like / new_empty return NaN-filled memory, so uninitialised reads show."""
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def _nan(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _nan(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _nan(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _nan(real_new_empty(self, *a, **k)))


# ---------------------------------------------------------------- equivalence of the three forms

@pytest.mark.parametrize(("T", "K", "V"), [(63, 16, 16), (65, 16, 16), (100, 60, 60), (1, 60, 60),
                                           (64, 16, 32), (130, 16, 16)])
def test_chunk_naive_step_agree(T, K, V, nan_empty):
    x = make_inputs(2, T, 2, K, V, seed=T + K)
    names = (*NAMES, "s0")
    ref = outputs_and_grads("naive", x)
    assert_same(outputs_and_grads("chunk_nan", x), ref, names)
    assert_same(outputs_and_grads("step", x), ref, names)


@pytest.mark.parametrize("decay", [0.0, W_MIN])
def test_decay_at_bounds(decay):
    x = make_inputs(1, 100, 2, 16, decay=decay, seed=3)
    ref = outputs_and_grads("naive", x)
    assert_same(outputs_and_grads("chunk", x), ref, (*NAMES, "s0"))


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_chunk_sizes(chunk_size):
    x = make_inputs(1, 77, 2, 16, seed=4)
    ref = outputs_and_grads("naive", x)
    assert_same(outputs_and_grads("chunk", x, chunk_size=chunk_size), ref, (*NAMES, "s0"))


def test_zero_initial_state_and_scale():
    x = make_inputs(2, 70, 2, 16, seed=5, state=False)
    o1, s1 = run("naive", x, scale=0.25)
    o2, s2 = run("chunk", x, scale=0.25)
    assert rel_err(o2, o1) <= TOL and rel_err(s2, s1) <= TOL
    o3, _ = run("naive", x)
    assert rel_err(o1, 0.25 * o3) <= TOL


def test_two_pieces_equal_one():
    x = make_inputs(2, 150, 2, 16, seed=6)
    o_full, s_full = run("chunk", x)
    cut = 57  # neither piece a multiple of the chunk size
    first = {n: t[:, :cut] for n, t in x.items() if n in NAMES}
    second = {n: t[:, cut:] for n, t in x.items() if n in NAMES}
    o1, s1 = run("chunk", {**first, "s0": x["s0"]})
    o2, s2 = run("chunk", {**second, "s0": s1})
    assert rel_err(torch.cat([o1, o2], 1), o_full) <= TOL
    assert rel_err(s2, s_full) <= TOL
    # prefill with the chunked form, then decode the rest token by token (the serving path)
    _, s_step = run("step", {**second, "s0": s1})
    assert rel_err(s_step, s_full) <= TOL


def test_output_final_state_false_and_dtypes():
    x = make_inputs(1, 20, 2, 16, seed=7)
    args = [x[n].detach().to(torch.bfloat16) for n in NAMES]
    for fn in (naive_recurrent_rwkv7, chunk_rwkv7_torch):
        o, s = fn(*args, output_final_state=False)
        assert s is None and o.dtype == torch.bfloat16 and o.shape == (1, 20, 2, 16)
        o, s = fn(*args)
        assert s.dtype == torch.float32 and s.shape == (1, 2, 16, 16)


# ---------------------------------------------------------------- dispatch

def test_dispatch_uses_torch_forms_on_cpu(monkeypatch):
    calls = []
    real_chunk, real_naive = ops_rwkv7.chunk_rwkv7_torch, ops_rwkv7.naive_recurrent_rwkv7
    monkeypatch.setattr(ops_rwkv7, "chunk_rwkv7_torch", lambda *a, **k: calls.append("chunk") or real_chunk(*a, **k))
    monkeypatch.setattr(ops_rwkv7, "naive_recurrent_rwkv7",
                        lambda *a, **k: calls.append("naive") or real_naive(*a, **k))

    def fake_fla(*a, **k):
        raise AssertionError("fla must not be used for CPU tensors")

    monkeypatch.setattr(ops_rwkv7, "_FLA", {"chunk": fake_fla, "recurrent": fake_fla})  # "installed"
    x = make_inputs(1, 40, 2, 16, seed=8)
    args = [x[n] for n in NAMES]
    o, s = rwkv7_attention(*args, initial_state=x["s0"])
    assert calls == ["chunk"]
    o_ref, s_ref = real_naive(*args, initial_state=x["s0"])
    assert rel_err(o, o_ref) <= TOL and rel_err(s, s_ref) <= TOL
    rwkv7_attention(*(t[:, :1] for t in args), initial_state=x["s0"])
    assert calls == ["chunk", "naive"]
    rwkv7_attention(*args, initial_state=x["s0"], backend="naive")
    rwkv7_attention(*args, initial_state=x["s0"], backend="torch")
    assert calls == ["chunk", "naive", "naive", "chunk"]


def test_dispatch_passes_fla_argument_order(monkeypatch):
    """backend='fla' calls fla's chunk_rwkv7(r, w, k, v, a, b, scale, initial_state, output_final_state)
    (fla 0.6.0's signature): a fake with those parameter names must see the right tensors."""
    seen = []

    def fake(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=False):
        seen.append((r, w, k, v, a, b, scale))
        return naive_recurrent_rwkv7(r, w, k, v, a, b, scale=scale, initial_state=initial_state,
                                     output_final_state=output_final_state)

    monkeypatch.setattr(ops_rwkv7, "_FLA", {"chunk": fake, "recurrent": fake})
    x = make_inputs(1, 10, 2, 16, seed=9)
    args = [x[n] for n in NAMES]
    o, s = rwkv7_attention(*args, scale=0.5, initial_state=x["s0"], backend="fla")
    assert len(seen) == 1 and all(p is q for p, q in zip(seen[0][:6], args)) and seen[0][6] == 0.5
    o_ref, s_ref = naive_recurrent_rwkv7(*args, scale=0.5, initial_state=x["s0"])
    assert rel_err(o, o_ref) <= TOL and rel_err(s, s_ref) <= TOL


def test_fla_backend_without_fla_raises(monkeypatch):
    monkeypatch.setattr(ops_rwkv7, "_FLA", {})  # as when the import failed
    assert not fla_available()
    x = make_inputs(1, 8, 2, 16, seed=10)
    with pytest.raises(RuntimeError, match="flash-linear-attention"):
        rwkv7_attention(*(x[n] for n in NAMES), backend="fla")


# ---------------------------------------------------------------- argument checking

@pytest.mark.parametrize("fn", [naive_recurrent_rwkv7, chunk_rwkv7_torch, rwkv7_attention])
def test_bad_shapes_raise_value_error(fn):
    x = {n: t.detach() for n, t in make_inputs(2, 9, 2, 16, seed=11).items()}
    args = [x[n] for n in NAMES]
    with pytest.raises(ValueError, match="r of shape"):
        fn(*(t[0] for t in args))  # 3-D
    for i, name in enumerate(NAMES):
        bad = list(args)
        bad[i] = args[i][:, :, :1] if name != "v" else args[i][:, :5]  # wrong H (or wrong T for v)
        with pytest.raises(ValueError, match=f"{'w' if name == 'r' else name} has shape"):
            fn(*bad)
    with pytest.raises(ValueError, match="initial_state"):
        fn(*args, initial_state=x["s0"][:, :, :, :8])
    with pytest.raises(ValueError, match="initial_state"):
        fn(*args, initial_state=x["s0"][:1])


# ---------------------------------------------------------------- GPU: fla against the torch path

@pytest.mark.skipif(not torch.cuda.is_available() or not fla_available(),
                    reason="needs CUDA and flash-linear-attention")
@pytest.mark.parametrize("T", [1, 63, 200])
def test_fla_matches_torch_on_gpu(T):
    """fla's Triton kernels (chunk_rwkv7 for training/prefill, fused_recurrent_rwkv7 for no-grad decode)
    against chunk_rwkv7_torch on the same CUDA fp32 inputs: outputs, final state and every gradient.
    Tolerance: relative RMS error, as fla's own tests (its kernels may use TF32 matmuls)."""
    x = {n: t.detach().cuda().requires_grad_(True) for n, t in make_inputs(2, T, 4, 64, seed=T).items()}
    args = [x[n] for n in NAMES]

    def rms_rel(a, b):
        return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt().clamp_min(1e-12)).item()

    def fwd_bwd(backend):
        o, s = rwkv7_attention(*args, initial_state=x["s0"], backend=backend)
        g = torch.Generator(device="cuda").manual_seed(0)
        loss = (o * torch.randn(o.shape, generator=g, device="cuda")).sum() \
            + (s * torch.randn(s.shape, generator=g, device="cuda")).sum()
        return o.detach(), s.detach(), torch.autograd.grad(loss, leaves(x))

    ref, got = fwd_bwd("torch"), fwd_bwd("fla")
    errs = {"o": rms_rel(got[0], ref[0]), "state": rms_rel(got[1], ref[1])}
    errs.update({f"d{n}": rms_rel(a, b) for n, a, b in zip((*NAMES, "s0"), got[2], ref[2])})
    assert all(e <= 1e-2 for e in errs.values()), errs
    with torch.no_grad():  # decode path: T == 1 without grad uses fused_recurrent_rwkv7
        o_f, s_f = rwkv7_attention(*args, initial_state=x["s0"], backend="fla")
        o_t, s_t = rwkv7_attention(*args, initial_state=x["s0"], backend="torch")
    assert rms_rel(o_f, o_t) <= 1e-2 and rms_rel(s_f, s_t) <= 1e-2


def test_torch_forms_ignore_bf16_autocast():
    """Training on a GPU without fla (or on CPU with --set train.precision=bf16) runs under bf16 autocast:
    the PyTorch forms must still compute in fp32 (triangular_solve has no bf16 kernel)."""
    x = make_inputs(1, 100, 2, 16, seed=3)
    args = [x[n] for n in ("r", "w", "k", "v", "a", "b")]
    ref, ref_s = rwkv7_attention(*args, initial_state=x["s0"], backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, s = rwkv7_attention(*args, initial_state=x["s0"], backend="torch")
        o1, _ = rwkv7_attention(*[t[:, :1] for t in args], initial_state=x["s0"], backend="torch")
    assert o.dtype == torch.float32
    torch.testing.assert_close(o, ref)
    torch.testing.assert_close(s, ref_s)
    ref1, _ = rwkv7_attention(*[t[:, :1] for t in args], initial_state=x["s0"], backend="torch")
    torch.testing.assert_close(o1, ref1)


def test_qwerky_kernels_env_selects_backend(monkeypatch):
    """QWERKY_KERNELS overrides the automatic choice (e.g. =torch while Triton cannot compile)."""
    x = make_inputs(1, 20, 2, 8, seed=4)
    args = [x[n] for n in ("r", "w", "k", "v", "a", "b")]
    monkeypatch.setattr(ops_rwkv7, "_FLA", {})  # fla not importable
    monkeypatch.setenv("QWERKY_KERNELS", "fla")
    with pytest.raises(RuntimeError, match="needs flash-linear-attention"):
        rwkv7_attention(*args)
    monkeypatch.setenv("QWERKY_KERNELS", "torch")
    o, _ = rwkv7_attention(*args)
    torch.testing.assert_close(o, rwkv7_attention(*args, backend="torch")[0])
