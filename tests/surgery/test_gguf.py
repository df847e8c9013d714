"""GGUF export runs in the released llama.cpp (through llama-cpp-python): a tiny teacher converted with the
`arwkv7` student at stage 0, its new parameters perturbed so that every part of the graph matters, gives
the same logits in llama.cpp as in qwerky's PyTorch forward and the same 32 greedy tokens as `generate()`.
Students llama.cpp cannot run are refused with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwerky.surgery import convert_teacher, save_student
from qwerky.teacher import QwerkyError
from qwerky_testing import build_tokenizer, tiny_teacher

gguf = pytest.importorskip("gguf", reason="gguf (gguf-py) is not installed: pip install -e '.[test]'")

from qwerky.surgery.gguf_export import export_blockers, export_gguf  # noqa: E402

PROMPT = [5, 17, 42, 99, 7, 250, 3, 3, 120, 64, 11, 300, 8, 77, 150, 201]
# heads of 64 (GQA 2 query / 1 key-value head): llama.cpp's SIMD wkv7 kernel needs head sizes in 64s
SHAPE = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64}


def _perturbed_student(family: str = "qwen2", **overrides: object) -> torch.nn.Module:
    """Stage-0 arwkv7 student with every new part moved off its neutral start (shift, bonus, k_k, k_a,
    gate, value residual, adapters), so a wrong tensor or a missed fold cannot pass."""
    torch.manual_seed(0)
    student = convert_teacher(tiny_teacher(family, **SHAPE, **overrides), mixer="arwkv7")
    with torch.no_grad():
        for m in student.mixers:
            m.shift.uniform_(-0.5, 1.0)
            m.bonus.normal_(0, 0.5)
            m.key_removal.add_(torch.randn_like(m.key_removal) * 0.3)
            m.key_iclr.uniform_(0.0, 1.0)
            m.decay_base.add_(torch.randn_like(m.decay_base))
            m.iclr_base.normal_(0, 1.0)
            for lora in [m.decay_lora, m.iclr_lora, m.gate_lora] + ([] if m.first_layer else [m.value_mix_lora]):
                lora.up.weight.normal_(0, 0.3)
            if not m.first_layer:
                m.value_mix_base.normal_(0, 1.0)
    return student.eval()


def _llama(path: Path, n_ctx: int = 128):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (CI installs it with '.[test]': pip install "
        "llama-cpp-python==0.3.36)")
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_threads=2,
                           seed=0, verbose=False)


def _greedy_llama(llm, prompt: list[int], n: int) -> list[int]:
    """Greedy decode one token at a time through llama.cpp's recurrent state."""
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


@pytest.mark.parametrize("family,quant,tol", [("qwen2", "f32", 2e-5), ("qwen2", "f16", 5e-3), ("llama", "f32", 2e-5)])
def test_llama_cpp_logits_and_greedy_match_pytorch(tmp_path: Path, family: str, quant: str, tol: float) -> None:
    overrides = {"tie_word_embeddings": False, "attention_bias": True} if family == "llama" else {}
    student = _perturbed_student(family, **overrides)
    save_student(student, build_tokenizer(), tmp_path / "student")
    path = export_gguf(student, tmp_path / "student", tmp_path / f"student-{quant}.gguf", quant=quant)
    llm = _llama(path)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = student(ids).logits[0].float().numpy()
    llm.reset()
    llm.eval(PROMPT)
    got = llm.scores[: len(PROMPT)]
    diff = float(abs(got - ref).max())
    scale = float(abs(ref).max())
    print(f"\n{family} {quant}: max |logit diff| = {diff:.3e} (max |logit| {scale:.2f}, relative {diff / scale:.2e})")
    assert diff / scale < tol, f"llama.cpp logits differ from PyTorch by {diff:.3e} (max |logit| {scale:.2f})"

    with torch.no_grad():
        gen = student.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, len(PROMPT):].tolist()
    mine = _greedy_llama(llm, PROMPT, 32)
    same = sum(a == b for a, b in zip(gen, mine))
    print(f"{family} {quant}: greedy 32 tokens, {same}/32 equal to generate()")
    llm.close()
    if quant == "f32":
        assert mine == gen
    else:  # f16 weights: near-ties may flip late in the continuation
        assert mine[:8] == gen[:8]


def test_cli_export_and_clear_errors(tmp_path: Path) -> None:
    tok = build_tokenizer()
    good = tmp_path / "arwkv7"
    save_student(convert_teacher(tiny_teacher("qwen3", **SHAPE), mixer="arwkv7"), tok, good)
    out = tmp_path / "m.gguf"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-m", "qwerky", "export", str(good), "--format", "gguf", "--out", str(out),
                          "--quant", "q8_0"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "arwkv7"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.time_mix_key.weight"] == "Q8_0" and types["blk.0.time_mix_w1.weight"] == "F32"
    assert not list(tmp_path.glob(".m.gguf.tmp-*"))  # written to a temporary sibling, then renamed

    bad = tmp_path / "rwkv7"
    save_student(convert_teacher(tiny_teacher("qwen2"), mixer="rwkv7"), tok, bad)
    res = subprocess.run([sys.executable, "-m", "qwerky", "export", str(bad), "--out", str(tmp_path / "x.gguf")],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 2
    assert "RoPE" in res.stderr and "arwkv7" in res.stderr and not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("mixer,options,layers,needle", [
    ("rwkv7", {}, (), "RoPE"),
    ("rwkv6", {}, (), "before the decay"),
    ("gated_deltanet", {}, (), "Gated DeltaNet"),
    ("window", {}, (), "sliding window"),
    ("arwkv7", {}, (1,), "hybrid"),
    ("arwkv7", {}, (), "head_dim 16"),
])
def test_students_llama_cpp_cannot_run_are_refused(tmp_path: Path, mixer: str, options: dict, layers: tuple,
                                                  needle: str) -> None:
    student = convert_teacher(tiny_teacher("qwen2"), mixer=mixer, mixer_options=options, attention_layers=layers)
    assert any(needle in r for r in export_blockers(student))
    with pytest.raises(QwerkyError, match="cannot export to GGUF") as err:
        export_gguf(student, tmp_path, tmp_path / "x.gguf")
    assert "arwkv7" in str(err.value) and not (tmp_path / "x.gguf").exists()


def test_unknown_quant_is_refused(tmp_path: Path) -> None:
    student = convert_teacher(tiny_teacher("qwen2"), mixer="arwkv7")
    with pytest.raises(QwerkyError, match="q4_k"):
        export_gguf(student, tmp_path, tmp_path / "x.gguf", quant="q4_k")
