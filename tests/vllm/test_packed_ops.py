"""The plugin's pure-PyTorch pieces, without vLLM: packed-batch recurrences, token shift, the mixer lookup.

(These run in the main CI; the engine tests next to them need vLLM and run via scripts/test_vllm.sh.)
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from qwerky.modeling.ops_rwkv7 import naive_recurrent_rwkv7
from qwerky.opspecs import OpSpec, all_op_specs
from qwerky.vllm import SUPPORTED_MIXERS, mixer_layer
from qwerky.vllm.config import VllmQwerkyConfig
from qwerky.vllm.ops import PackedBatch, run_packed, rwkv7_packed, token_shift_packed

LENS = [1, 1, 5, 70, 3]  # decodes first, then prefills (70 > one 64-token chunk)
SLOTS = [3, 1, 4, 2, 5]
INIT = [True, True, False, True, False]  # decodes always continue; prefill 2 continues a chunk


def _batch() -> PackedBatch:
    qsl = torch.tensor([0] + list(torch.tensor(LENS).cumsum(0)))
    return PackedBatch(2, 3, qsl, torch.tensor(SLOTS), torch.tensor(INIT[2:]))


def _rwkv7_inputs(N: int, H: int, D: int, g: torch.Generator):
    r, k, v = (torch.randn(N, H, D, generator=g) for _ in range(3))
    w = -torch.rand(N, H, D, generator=g) * 0.6
    kappa = torch.nn.functional.normalize(torch.randn(N, H, D, generator=g), dim=-1)
    a = torch.rand(N, H, D, generator=g)
    return [r, w, k * 0.5, v, -kappa, kappa * a]


def _packed_case(spec: OpSpec) -> tuple:
    """(sequence op, its reference form, inputs [N, H, ...] in the op's order, scale, index of the value input) for
    one op of the registry (qwerky.opspecs): tensors without a time axis (RWKV-6's bonus u) are bound to the forms,
    so the packed runner sees the per-token tensors only, as the vLLM layers call it."""
    timed = [n for n in spec.tensor_names if n in spec.time_tensors]
    if spec.tensor_names[:len(timed)] != tuple(timed):
        raise AssertionError(f"{spec.name}: tensors without a time axis must come last to be bound")

    def make_inputs(N: int, H: int, D: int, g: torch.Generator) -> list[torch.Tensor]:
        seed = int(torch.randint(0, 2**31, (1,), generator=g))
        x = spec.make_inputs(1, N, H, D, D, seed=seed, state=False)
        make_inputs.fixed = [x[n].detach() for n in spec.tensor_names if n not in spec.time_tensors]
        return [x[n].detach()[0] for n in timed]

    def bind(form):
        return lambda *xs, **kw: form(*xs, *make_inputs.fixed, **kw)

    make_inputs.fixed = []
    return bind(spec.dispatch), bind(spec.naive), make_inputs, 8**-0.5, timed.index("v")


# every op of the registry, as the vLLM layers run it packed (a new op is tested here without an edit)
OPS = {spec.name: _packed_case(spec) for spec in all_op_specs()}


@pytest.mark.parametrize("mode", ["packed", "loop"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_packed_batch_equals_each_sequence_alone(op: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 decodes then 3 prefills (one continuing from its slot), run through `run_packed` with the mixer's
    op: each request's output and final state are those of the reference recurrence run on that request
    alone; untouched slots stay; a padded slot id (-1) writes only to slot 0 (vLLM's null block). "packed":
    the three prefills are one call of the op's varlen form; "loop": one call each."""
    monkeypatch.setenv("QWERKY_VLLM_PREFILL", mode)
    fast, naive, make_inputs, scale, value = OPS[op]
    H, D = 2, 8
    N = sum(LENS)
    g = torch.Generator().manual_seed(0)
    inputs = make_inputs(N, H, D, g)
    state = torch.randn(7, H, D, D, generator=g) * 0.1
    state[SLOTS[4]] = float("nan")  # a new request's slot may hold anything: it must start from zero
    before = state.clone()
    prefill_calls = []

    def step(xs, s0, cu_seqlens):
        if xs[0].shape[1] > 1 or cu_seqlens is not None:
            prefill_calls.append(None if cu_seqlens is None else cu_seqlens.tolist())
        o, s = fast(*xs, scale=scale, initial_state=None if s0 is None else s0[0], output_final_state=True,
                    backend="torch", cu_seqlens=cu_seqlens)
        return o, [s]

    out = torch.zeros_like(inputs[value])
    batch = _batch()
    run_packed(step, inputs, [state], batch, out)
    assert prefill_calls == ([[0, *torch.tensor(LENS[2:]).cumsum(0).tolist()]] if mode == "packed"
                             else [None, None, None])
    qsl = batch.query_start_loc
    for i, (start, end, slot) in enumerate(zip(qsl[:-1].tolist(), qsl[1:].tolist(), SLOTS)):
        s0 = before[slot][None] if INIT[i] else None
        ref_o, ref_s = naive(*(x[None, start:end] for x in inputs), scale=scale, initial_state=s0)
        torch.testing.assert_close(out[start:end], ref_o[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(state[slot], ref_s[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state[6], before[6])

    pad = state.clone()
    run_packed(step, [x[:2] for x in inputs], [pad], PackedBatch(2, 0, qsl[:3], torch.tensor([3, -1])),
               torch.zeros_like(out[:2]))
    torch.testing.assert_close(pad[1:3], state[1:3])


def test_rwkv7_packed_matches_run_packed() -> None:
    g = torch.Generator().manual_seed(2)
    inputs = _rwkv7_inputs(sum(LENS), 2, 8, g)
    s1 = torch.randn(7, 2, 8, 8, generator=g) * 0.1
    s2 = s1.clone()
    o1 = rwkv7_packed(*inputs, s1, _batch(), scale=8**-0.5, backend="torch")
    o2 = torch.zeros_like(o1)
    run_packed(lambda xs, s0, cu: (lambda o, s: (o, [s]))(*naive_recurrent_rwkv7(
        *xs, scale=8**-0.5, initial_state=None if s0 is None else s0[0])), inputs, [s2], _batch(), o2, varlen=False)
    torch.testing.assert_close(o1, o2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s1, s2, atol=1e-4, rtol=1e-4)


VARLEN_LENS = [5, 70, 0, 1, 130, 64]  # not chunk multiples, an empty one, one of exactly a chunk


@pytest.mark.parametrize("op", sorted(OPS))
def test_varlen_chunked_form_equals_each_sequence_alone(op: str) -> None:
    """The chunked form with cu_seqlens (sequences packed along T, each from its own initial state) gives
    each sequence's output and final state as the same form run on it alone; an empty sequence keeps its
    initial state. This is what vLLM's packed prefill runs."""
    fast, _, make_inputs, scale, _ = OPS[op]
    H, D = 3, 8
    g = torch.Generator().manual_seed(3)
    inputs = [x[None] for x in make_inputs(sum(VARLEN_LENS), H, D, g)]
    s0 = torch.randn(len(VARLEN_LENS), H, D, D, generator=g) * 0.1
    cu = torch.tensor([0, *torch.tensor(VARLEN_LENS).cumsum(0).tolist()])
    o, s = fast(*inputs, scale=scale, initial_state=s0, backend="torch", cu_seqlens=cu)
    assert s.shape == s0.shape
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if a == b:
            torch.testing.assert_close(s[i], s0[i])
            continue
        o_i, s_i = fast(*(x[:, a:b] for x in inputs), scale=scale, initial_state=s0[i:i + 1], backend="torch")
        torch.testing.assert_close(o[:, a:b], o_i, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s[i], s_i[0], atol=1e-5, rtol=1e-5)


def test_varlen_layout_rejects_offsets_that_do_not_cover_the_tokens() -> None:
    from qwerky.modeling.ops_varlen import chunk_layout

    with pytest.raises(ValueError, match="cu_seqlens must rise from 0"):
        chunk_layout(torch.tensor([0, 5, 3]), 64, 3)


def test_token_shift_packed() -> None:
    """Each row gets the row before it in its own request; a request's first row gets its slot's saved row
    when it continues (decodes, continued chunks) and zero when it is new; each slot keeps its last row."""
    C = 3
    N = sum(LENS)
    x = torch.randn(N, C)
    shift = torch.randn(7, C)
    before = shift.clone()
    batch = _batch()
    x_prev = token_shift_packed(x, shift, batch)
    qsl = batch.query_start_loc.tolist()
    for i, (start, end, slot) in enumerate(zip(qsl[:-1], qsl[1:], SLOTS)):
        first = before[slot] if INIT[i] else torch.zeros(C)
        torch.testing.assert_close(x_prev[start:end], torch.cat([first[None], x[start:end - 1]]))
        torch.testing.assert_close(shift[slot], x[end - 1])
    torch.testing.assert_close(shift[[0, 6]], before[[0, 6]])


def test_mixer_lookup_and_config() -> None:
    """The supported mixers are derived: every registered mixer with a module of its name in qwerky/vllm."""
    from pathlib import Path

    import qwerky.vllm
    from qwerky.modeling.mixer_base import mixer_names

    here = Path(qwerky.vllm.__file__).parent
    assert set(SUPPORTED_MIXERS) == {m for m in mixer_names() if (here / f"{m}.py").is_file()}
    assert {"rwkv7", "window", "arwkv7"} <= set(SUPPORTED_MIXERS)
    if importlib.util.find_spec("vllm.engine") is not None:  # the layer modules import vLLM: checked in its venv
        for mixer in SUPPORTED_MIXERS:
            layer = mixer_layer(mixer)
            assert isinstance(layer, type) and layer.__module__ == f"qwerky.vllm.{mixer}", mixer
    with pytest.raises(ValueError, match="does not implement the 'made_up' mixer"):
        mixer_layer("made_up")
    from qwerky_testing import tiny_config

    cfg = VllmQwerkyConfig(teacher_config=tiny_config("qwen3").to_dict(), mixer="rwkv7", use_rope=True)
    assert cfg.model_type == "qwerky" and cfg.max_position_embeddings == 4096
    assert cfg.num_key_value_heads == 2 and cfg.head_dim == 16


def test_hybrid_folders_are_routed_to_the_hybrid_class() -> None:
    """A hybrid's config.json says QwerkyForCausalLM like any student: the config class vLLM loads sends it
    to the hybrid architecture and tells vLLM which layers are attention (it sizes the KV cache from that)."""
    from qwerky.vllm import ARCHITECTURES
    from qwerky.vllm.config import HYBRID_ARCHITECTURE
    from qwerky_testing import tiny_config

    teacher = tiny_config("qwen2", num_hidden_layers=3).to_dict()
    plain = VllmQwerkyConfig(teacher_config=teacher, mixer="rwkv7", architectures=["QwerkyForCausalLM"])
    assert plain.architectures == ["QwerkyForCausalLM"] and getattr(plain, "layers_block_type", None) is None
    hybrid = VllmQwerkyConfig(teacher_config=teacher, mixer="rwkv7", attention_layers=[1],
                              architectures=["QwerkyForCausalLM"])
    assert hybrid.architectures == [HYBRID_ARCHITECTURE] and HYBRID_ARCHITECTURE in ARCHITECTURES
    assert hybrid.layers_block_type == ["linear_attention", "attention", "linear_attention"]


def test_package_imports_without_vllm() -> None:
    import importlib.util
    import subprocess
    import sys

    code = ("import sys, qwerky.vllm, qwerky.vllm.ops, qwerky.vllm.config, qwerky.cli; "
            "assert 'vllm' not in sys.modules, 'vllm was imported'")
    if importlib.util.find_spec("vllm") is None:
        code += "; import importlib; importlib.import_module('qwerky.vllm').SUPPORTED_MIXERS"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
