"""RWKV-6 recurrence: chunked == naive == token-by-token step, outputs, final state and gradients.

The ops compute in fp32 whatever the input dtype; comparisons use max |x - y| / max |y|.
Log-decay w spans RAD-RWKV6's clamp [-5, 0]; u is the per-head bonus (RAD-RWKV6 passes u = 1).
"""

from __future__ import annotations

import pytest
import torch

from qwerky.modeling import ops_rwkv6
from qwerky.modeling.ops_rwkv6 import (
    chunk_rwkv6_torch,
    naive_recurrent_rwkv6,
    recurrent_step_rwkv6,
    rwkv6_attention,
)

W_MIN = -5.0
TOL = 1e-4
NAMES = ("r", "k", "v", "w", "u")


def fla_available() -> bool:
    return bool(ops_rwkv6._fla())


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| (0 when both are exactly zero); NaN anywhere gives inf."""
    if not (torch.isfinite(x).all() and torch.isfinite(ref).all()):
        return float("inf")
    den = ref.abs().max().item()
    num = (x - ref).abs().max().item()
    return num / den if den > 0 else num


def nan_padded(x: torch.Tensor) -> torch.Tensor:
    """`x` as a non-contiguous view into a larger NaN-filled buffer (reads past it give NaN)."""
    if x.dim() != 4:
        return x
    B, T, H, D = x.shape
    buf = torch.full((B, T + 3, H + 1, D + 5), float("nan"), dtype=x.dtype)
    buf[:, 1:T + 1, :H, 2:D + 2] = x
    return buf[:, 1:T + 1, :H, 2:D + 2]


def make_inputs(B: int, T: int, H: int, K: int, V: int | None = None, *, decay: str | float = "random",
                bonus: str = "random", seed: int = 0, state: bool = True) -> dict[str, torch.Tensor]:
    V = K if V is None else V
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    if decay == "random":
        w = W_MIN * torch.sigmoid(rnd(B, T, H, K) * 2)
    else:
        w = torch.full((B, T, H, K), float(decay))
    u = rnd(H, K) if bonus == "random" else torch.ones(H, K)
    x = {"r": rnd(B, T, H, K) * K**-0.5, "k": rnd(B, T, H, K) * K**-0.5, "v": rnd(B, T, H, V), "w": w, "u": u}
    if state:
        x["s0"] = rnd(B, H, K, V) * 0.5
    return {n: t.requires_grad_(True) for n, t in x.items()}


def leaves(x):
    return [x[n] for n in (*NAMES, "s0") if n in x]


def run_stepwise(x, scale=1.0):
    B, T, H, K = x["r"].shape
    S = x.get("s0")
    if S is None:
        S = torch.zeros(B, H, K, x["v"].shape[-1])
    outs = []
    for t in range(T):
        o, S = recurrent_step_rwkv6(*(x[n][:, t:t + 1] for n in ("r", "k", "v", "w")), x["u"], state=S,
                                    scale=scale)
        outs.append(o)
    return torch.cat(outs, dim=1), S


def run(form, x, scale=1.0, **kw):
    args = [x[n] for n in NAMES]
    if form == "naive":
        return naive_recurrent_rwkv6(*args, scale=scale, initial_state=x.get("s0"), **kw)
    if form == "chunk":
        return chunk_rwkv6_torch(*args, scale=scale, initial_state=x.get("s0"), **kw)
    if form == "chunk_nan":
        return chunk_rwkv6_torch(*(nan_padded(t) for t in args), scale=scale, initial_state=x.get("s0"), **kw)
    if form == "step":
        return run_stepwise(x, scale)
    raise ValueError(form)


def outputs_and_grads(form, x, seed=1, **kw):
    o, s = run(form, x, **kw)
    g = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=g)).sum() + (s * torch.randn(s.shape, generator=g)).sum()
    return o.detach(), s.detach(), torch.autograd.grad(loss, leaves(x))


def assert_same(got, ref, names, tol=TOL):
    errs = {"o": rel_err(got[0], ref[0]), "state": rel_err(got[1], ref[1])}
    errs.update({f"d{n}": rel_err(a, b) for n, a, b in zip(names, got[2], ref[2])})
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
                                           (33, 16, 32)])
def test_chunk_naive_step_agree(T, K, V, nan_empty):
    x = make_inputs(2, T, 2, K, V, seed=T + K)
    names = (*NAMES, "s0")
    ref = outputs_and_grads("naive", x)
    assert_same(outputs_and_grads("chunk_nan", x), ref, names)
    assert_same(outputs_and_grads("step", x), ref, names)


@pytest.mark.parametrize("decay", [0.0, W_MIN])
@pytest.mark.parametrize("bonus", ["random", "ones"])
def test_decay_at_bounds(decay, bonus):
    x = make_inputs(1, 100, 2, 16, decay=decay, bonus=bonus, seed=3)
    ref = outputs_and_grads("naive", x)
    assert_same(outputs_and_grads("chunk", x), ref, (*NAMES, "s0"))


@pytest.mark.parametrize("chunk_size", [8, 16, 32])
def test_chunk_sizes(chunk_size):
    # RWKV-6's decay is unbounded below -5 * chunk; at chunk 32 keep it within exp range (|w| <= 2)
    x = make_inputs(1, 77, 2, 16, seed=4)
    if chunk_size == 32:
        with torch.no_grad():
            x["w"].mul_(0.4)
    ref = outputs_and_grads("naive", x)
    assert_same(outputs_and_grads("chunk", x, chunk_size=chunk_size), ref, (*NAMES, "s0"))


def test_zero_initial_state_and_scale():
    x = make_inputs(2, 40, 2, 16, seed=5, state=False)
    o1, s1 = run("naive", x, scale=0.25)
    o2, s2 = run("chunk", x, scale=0.25)
    assert rel_err(o2, o1) <= TOL and rel_err(s2, s1) <= TOL
    o3, _ = run("naive", x)
    assert rel_err(o1, 0.25 * o3) <= TOL


def test_two_pieces_equal_one():
    x = make_inputs(2, 90, 2, 16, seed=6)
    o_full, s_full = run("chunk", x)
    cut = 37
    first = {n: (t[:, :cut] if n != "u" else t) for n, t in x.items() if n in NAMES}
    second = {n: (t[:, cut:] if n != "u" else t) for n, t in x.items() if n in NAMES}
    o1, s1 = run("chunk", {**first, "s0": x["s0"]})
    o2, s2 = run("chunk", {**second, "s0": s1})
    assert rel_err(torch.cat([o1, o2], 1), o_full) <= TOL
    assert rel_err(s2, s_full) <= TOL
    _, s_step = run("step", {**second, "s0": s1})
    assert rel_err(s_step, s_full) <= TOL


def test_output_final_state_false_and_dtypes():
    x = make_inputs(1, 20, 2, 16, seed=7)
    args = [x[n].detach().to(torch.bfloat16) for n in NAMES]
    for fn in (naive_recurrent_rwkv6, chunk_rwkv6_torch):
        o, s = fn(*args, output_final_state=False)
        assert s is None and o.dtype == torch.bfloat16 and o.shape == (1, 20, 2, 16)
        o, s = fn(*args)
        assert s.dtype == torch.float32 and s.shape == (1, 2, 16, 16)


# ---------------------------------------------------------------- dispatch

def test_dispatch_uses_torch_forms_on_cpu(monkeypatch):
    calls = []
    real_chunk, real_naive = ops_rwkv6.chunk_rwkv6_torch, ops_rwkv6.naive_recurrent_rwkv6
    monkeypatch.setattr(ops_rwkv6, "chunk_rwkv6_torch", lambda *a, **k: calls.append("chunk") or real_chunk(*a, **k))
    monkeypatch.setattr(ops_rwkv6, "naive_recurrent_rwkv6",
                        lambda *a, **k: calls.append("naive") or real_naive(*a, **k))

    def fake_fla(*a, **k):
        raise AssertionError("fla must not be used for CPU tensors")

    monkeypatch.setattr(ops_rwkv6, "_FLA", {"chunk": fake_fla, "recurrent": fake_fla})
    x = make_inputs(1, 40, 2, 16, seed=8)
    args = [x[n] for n in NAMES]
    o, s = rwkv6_attention(*args, initial_state=x["s0"])
    assert calls == ["chunk"]
    o_ref, s_ref = real_naive(*args, initial_state=x["s0"])
    assert rel_err(o, o_ref) <= TOL and rel_err(s, s_ref) <= TOL
    rwkv6_attention(*(t[:, :1] for t in args[:4]), x["u"], initial_state=x["s0"])
    assert calls == ["chunk", "naive"]
    rwkv6_attention(*args, initial_state=x["s0"], backend="naive")
    rwkv6_attention(*args, initial_state=x["s0"], backend="torch")
    assert calls == ["chunk", "naive", "naive", "chunk"]


def test_dispatch_passes_fla_argument_order(monkeypatch):
    """backend='fla' calls fla's chunk_rwkv6(r, k, v, w, u, scale, initial_state, output_final_state)."""
    seen = []

    def fake(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False):
        seen.append((r, k, v, w, u, scale))
        return naive_recurrent_rwkv6(r, k, v, w, u, scale=scale, initial_state=initial_state,
                                     output_final_state=output_final_state)

    monkeypatch.setattr(ops_rwkv6, "_FLA", {"chunk": fake, "recurrent": fake})
    x = make_inputs(1, 10, 2, 16, seed=9)
    args = [x[n] for n in NAMES]
    o, s = rwkv6_attention(*args, scale=0.5, initial_state=x["s0"], backend="fla")
    assert len(seen) == 1 and all(p is q for p, q in zip(seen[0][:5], args)) and seen[0][5] == 0.5
    o_ref, s_ref = naive_recurrent_rwkv6(*args, scale=0.5, initial_state=x["s0"])
    assert rel_err(o, o_ref) <= TOL and rel_err(s, s_ref) <= TOL


def test_fla_backend_without_fla_raises(monkeypatch):
    monkeypatch.setattr(ops_rwkv6, "_FLA", {})
    x = make_inputs(1, 8, 2, 16, seed=10)
    with pytest.raises(RuntimeError, match="flash-linear-attention"):
        rwkv6_attention(*(x[n] for n in NAMES), backend="fla")


# ---------------------------------------------------------------- argument checking

@pytest.mark.parametrize("fn", [naive_recurrent_rwkv6, chunk_rwkv6_torch, rwkv6_attention])
def test_bad_shapes_raise_value_error(fn):
    x = {n: t.detach() for n, t in make_inputs(2, 9, 2, 16, seed=11).items()}
    args = [x[n] for n in NAMES]
    with pytest.raises(ValueError, match="r of shape"):
        fn(*(t[0] for t in args[:4]), x["u"])  # 3-D
    for name, bad_value, msg in [("k", x["k"][:, :, :1], "k has shape"), ("w", x["w"][:, :4], "w has shape"),
                                 ("r", x["r"][:, :, :, :8], "k has shape"), ("v", x["v"][:, :5], "v has shape"),
                                 ("u", x["u"][:1], "u has shape"), ("u", x["u"][None], "u has shape")]:
        kw = dict(zip(NAMES, args))
        kw[name] = bad_value
        with pytest.raises(ValueError, match=msg):
            fn(*(kw[n] for n in NAMES))
    with pytest.raises(ValueError, match="initial_state"):
        fn(*args, initial_state=x["s0"][:, :, :, :8])
    with pytest.raises(ValueError, match="initial_state"):
        fn(*args, initial_state=x["s0"][:1])


# ---------------------------------------------------------------- GPU: fla against the torch path

@pytest.mark.skipif(not torch.cuda.is_available() or not fla_available(),
                    reason="needs CUDA and flash-linear-attention")
@pytest.mark.parametrize("T", [1, 63, 200])
def test_fla_matches_torch_on_gpu(T):
    """fla's chunk_rwkv6 (training/prefill) and fused_recurrent_rwkv6 (no-grad decode) against
    chunk_rwkv6_torch on the same CUDA fp32 inputs; relative RMS error as in fla's own tests."""
    x = {n: t.detach().cuda().requires_grad_(True) for n, t in make_inputs(2, T, 4, 64, seed=T).items()}
    args = [x[n] for n in NAMES]

    def rms_rel(a, b):
        return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt().clamp_min(1e-12)).item()

    def fwd_bwd(backend):
        o, s = rwkv6_attention(*args, initial_state=x["s0"], backend=backend)
        g = torch.Generator(device="cuda").manual_seed(0)
        loss = (o * torch.randn(o.shape, generator=g, device="cuda")).sum() \
            + (s * torch.randn(s.shape, generator=g, device="cuda")).sum()
        return o.detach(), s.detach(), torch.autograd.grad(loss, leaves(x))

    ref, got = fwd_bwd("torch"), fwd_bwd("fla")
    errs = {"o": rms_rel(got[0], ref[0]), "state": rms_rel(got[1], ref[1])}
    errs.update({f"d{n}": rms_rel(a, b) for n, a, b in zip((*NAMES, "s0"), got[2], ref[2])})
    assert all(e <= 1e-2 for e in errs.values()), errs
    with torch.no_grad():
        o_f, s_f = rwkv6_attention(*args, initial_state=x["s0"], backend="fla")
        o_t, s_t = rwkv6_attention(*args, initial_state=x["s0"], backend="torch")
    assert rms_rel(o_f, o_t) <= 1e-2 and rms_rel(s_f, s_t) <= 1e-2


def test_torch_forms_ignore_bf16_autocast():
    """Under bf16 autocast the PyTorch forms still compute in fp32 (same result as without autocast)."""
    x = make_inputs(1, 100, 2, 16, seed=3)
    args = [x[n] for n in ("r", "k", "v", "w", "u")]
    ref, ref_s = rwkv6_attention(*args, initial_state=x["s0"], backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, s = rwkv6_attention(*args, initial_state=x["s0"], backend="torch")
    torch.testing.assert_close(o, ref)
    torch.testing.assert_close(s, ref_s)
