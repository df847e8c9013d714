"""The plugin's pure-PyTorch pieces, without vLLM: the packed-batch recurrence and the mixer lookup.

(These run in the main CI; the engine tests next to them need vLLM and run via scripts/test_vllm.sh.)
"""

from __future__ import annotations

import pytest
import torch

from qwerky.modeling.ops_rwkv7 import naive_recurrent_rwkv7
from qwerky.vllm import SUPPORTED_MIXERS, mixer_layer
from qwerky.vllm.config import VllmQwerkyConfig
from qwerky.vllm.ops import rwkv7_packed


def _inputs(N: int, H: int, D: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(N, H, D, generator=g) for _ in range(3))
    w = -torch.rand(N, H, D, generator=g) * 0.6
    kappa = torch.nn.functional.normalize(torch.randn(N, H, D, generator=g), dim=-1)
    a = torch.rand(N, H, D, generator=g)
    return r, w, k * 0.5, v, -kappa, kappa * a


def test_packed_batch_equals_each_sequence_alone() -> None:
    """2 decodes then 3 prefills (one continuing from its slot): each request's output and final state are
    those of the reference recurrence run on that request alone; a padded slot id (-1) is harmless."""
    H, D = 2, 8
    lens = [1, 1, 5, 70, 3]  # decodes first, then prefills (70 > one 64-token chunk)
    slots = [3, 1, 4, 2, 5]
    init_flags = [True, True, False, True, False]  # decodes always continue; prefill 2 continues a chunk
    N = sum(lens)
    r, w, k, v, a, b = _inputs(N, H, D)
    g = torch.Generator().manual_seed(1)
    state = torch.randn(7, H, D, D, generator=g) * 0.1
    before = state.clone()
    qsl = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)))
    o = rwkv7_packed(r, w, k, v, a, b, state, torch.tensor(slots), qsl, torch.tensor(init_flags[2:]),
                     num_decodes=2, num_prefills=3, scale=D**-0.5, backend="torch")
    for i, (start, end, slot) in enumerate(zip(qsl[:-1].tolist(), qsl[1:].tolist(), slots)):
        s0 = before[slot][None] if init_flags[i] else None
        ref_o, ref_s = naive_recurrent_rwkv7(*(x[None, start:end] for x in (r, w, k, v, a, b)), scale=D**-0.5,
                                             initial_state=s0)
        torch.testing.assert_close(o[start:end], ref_o[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(state[slot], ref_s[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state[6], before[6])  # untouched slots stay as they were

    pad = state.clone()
    rwkv7_packed(r[:2], w[:2], k[:2], v[:2], a[:2], b[:2], pad, torch.tensor([3, -1]), qsl[:3], None,
                 num_decodes=2, num_prefills=0, scale=D**-0.5, backend="torch")
    torch.testing.assert_close(pad[1:3], state[1:3])  # the padded row wrote only to slot 0 (vLLM's null block)


def test_mixer_lookup_and_config() -> None:
    assert "rwkv7" in SUPPORTED_MIXERS
    with pytest.raises(ValueError, match="does not implement the 'window' mixer"):
        mixer_layer("window")
    from qwerky_testing import tiny_config

    cfg = VllmQwerkyConfig(teacher_config=tiny_config("qwen3").to_dict(), mixer="rwkv7", use_rope=True)
    assert cfg.model_type == "qwerky" and cfg.max_position_embeddings == 4096
    assert cfg.num_key_value_heads == 2 and cfg.head_dim == 16


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
