"""A GGUF file as a teacher: a tiny llama GGUF written here with gguf-py (no download) loads as the same
dense model, with its tokenizer and chat template, through every teacher entry point; bad files get one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qwerky.cli import main
from qwerky.teacher import QwerkyError, load_config, load_teacher, load_tokenizer
from qwerky_testing import build_tokenizer, tiny_teacher

gguf = pytest.importorskip("gguf")

QUANTISED = "blk.0.ffn_down.weight"  # one matrix stored as Q8_0: the loader must dequantise it


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k row order (the inverse of what transformers undoes on load)."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model) -> dict[str, np.ndarray]:
    """llama.cpp tensor name -> array, as convert_hf_to_gguf writes a LlamaForCausalLM (tied head: no output)."""
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = _permute(w, cfg.num_attention_heads, cfg.num_attention_heads)
            elif gg == "attn_k":
                w = _permute(w, cfg.num_attention_heads, cfg.num_key_value_heads)
            out[f"blk.{i}.{gg}.weight"] = np.ascontiguousarray(w)
    return out


def write_tiny_gguf(path: Path, tokenizer_dir: Path, arch: str = "llama", tensors: bool = True):
    """A 2-layer hidden-64 llama teacher as a GGUF file; returns the HF model with the weights the file holds."""
    from qwerky.surgery.gguf_export import _tokenizer_entries

    model = tiny_teacher("llama", seed=1)
    cfg = model.config
    tok = _tokenizer_entries(tokenizer_dir, cfg.vocab_size)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_eos_token_id(tok["ids"]["eos"])
    w.add_pad_token_id(tok["ids"]["pad"])
    w.add_add_bos_token(False)
    w.add_chat_template(tok["chat_template"])
    if tensors:
        arrays = _tensors(model)
        for name, array in arrays.items():
            if name == QUANTISED:
                q8 = gguf.GGMLQuantizationType.Q8_0
                data = gguf.quants.quantize(array, q8)
                w.add_tensor(name, data, raw_dtype=q8)
                # the reference model holds what the file holds: the Q8_0 values, dequantised
                model.model.layers[0].mlp.down_proj.weight.data = torch.from_numpy(gguf.quants.dequantize(data, q8))
            else:
                w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, object, object]:
    """(file, the reference HF model, the HF tokenizer it was written from)."""
    root = tmp_path_factory.mktemp("gguf")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(root / "tok")
    path = root / "tiny-llama.gguf"
    model = write_tiny_gguf(path, root / "tok")
    return path, model, tokenizer


def test_gguf_teacher_equals_the_dense_model(tiny_gguf) -> None:
    path, reference, _ = tiny_gguf
    teacher = load_teacher(path)
    assert type(teacher).__name__ == "LlamaForCausalLM" and teacher.dtype == torch.float32
    assert not getattr(teacher, "is_quantized", False) and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher.config.num_hidden_layers == 2 and teacher.config.tie_word_embeddings
    ids = torch.randint(0, reference.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = reference(ids).logits, teacher(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ref = reference.state_dict()
    for name, tensor in teacher.state_dict().items():  # q/k un-permuted, Q8_0 dequantised: all bit-exact
        assert torch.equal(tensor, ref[name]), name


def test_gguf_teacher_bf16_on_request(tiny_gguf) -> None:
    teacher = load_teacher(tiny_gguf[0], dtype=torch.bfloat16)
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}


def test_a_model_left_marked_quantised_is_made_plain(tiny_gguf, tmp_path: Path) -> None:
    """What transformers does without GgufConfig(dequantize=True): dequantised, but marked (save refuses)."""
    from transformers import AutoModelForCausalLM

    from qwerky.teacher_gguf import _plain

    path, reference, _ = tiny_gguf
    marked = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    assert marked.is_quantized
    plain = _plain(marked, torch.float32)
    assert not getattr(plain, "is_quantized", False)
    plain.save_pretrained(tmp_path / "plain")
    ids = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_gguf_tokenizer_and_chat_template(tiny_gguf) -> None:
    path, _, reference = tiny_gguf
    tok = load_tokenizer(path)
    text = "The quick brown fox keeps a fixed-size state. What is the pass key?"
    assert tok(text).input_ids == reference(text).input_ids
    assert tok.chat_template == reference.chat_template
    chat = [{"role": "user", "content": "What is the pass key?"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        reference.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert tok.eos_token == "<|endoftext|>"


def test_plan_reads_only_the_metadata(tiny_gguf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_weights(*_args, **_kwargs):
        raise AssertionError("plan dequantised a weight")

    monkeypatch.setattr(gguf, "dequantize", no_weights)
    monkeypatch.setattr(gguf.quants, "dequantize", no_weights)
    assert load_config(tiny_gguf[0]).num_hidden_layers == 2
    json_path = tmp_path / "p.json"
    assert main(["plan", "--teacher", str(tiny_gguf[0]), "--gpus", "1", "--gpu-mem", "80", "--json",
                 str(json_path)]) == 0
    plan = json.loads(json_path.read_text())
    assert plan["teacher"]["layers"] == 2 and plan["teacher"]["hidden"] == 64


def test_convert_stage0_from_gguf_carries_tokenizer_and_chat_template(tiny_gguf, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path, _, reference = tiny_gguf
    out = tmp_path / "student"
    assert main(["convert", "--teacher", str(path), "--stages", "0", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwerky" and cfg["teacher_config"]["model_type"] == "llama"
    assert (out / "tokenizer.json").is_file()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == reference.chat_template
    assert tok("the pass key").input_ids == reference("the pass key").input_ids


def test_eval_loaders_take_a_gguf(tiny_gguf) -> None:
    from qwerky.eval.models import load_model
    from qwerky.eval.models import load_tokenizer as eval_tokenizer

    path, reference, _ = tiny_gguf
    model = load_model(path, dtype="auto")
    assert model.dtype == torch.float32 and not model.training
    assert eval_tokenizer(path).chat_template


def _one_error_line(args: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qwerky: error:"), lines
    return lines[0]


def test_unsupported_gguf_architecture_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    path = tmp_path / "rwkv.gguf"
    write_tiny_gguf(path, tmp_path / "tok", arch="rwkv7", tensors=False)
    line = _one_error_line(["convert", "--teacher", str(path), "--stages", "0", "--out", str(tmp_path / "s")], capsys)
    assert "GGUF architecture 'rwkv7'" in line and "cannot load from GGUF" in line
    assert "llama" in line and "qwen2" in line  # names what it can load
    assert not (tmp_path / "s").exists()
    with pytest.raises(QwerkyError, match="rwkv7"):
        load_config(path)


def test_not_a_gguf_file_and_missing_file_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_text("this is not a model\n")
    line = _one_error_line(["convert", "--teacher", str(bad), "--stages", "0", "--out", str(tmp_path / "s")], capsys)
    assert "is not a GGUF file" in line
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert "is not a valid GGUF file" in _one_error_line(["plan", "--teacher", str(truncated)], capsys)
    missing = tmp_path / "nope.gguf"
    assert "GGUF file not found" in _one_error_line(["convert", "--teacher", str(missing), "--stages", "0", "--out",
                                                     str(tmp_path / "s")], capsys)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x00" * 16)
    assert "is a file, not a model folder" in _one_error_line(["convert", "--teacher", str(weights), "--stages", "0",
                                                               "--out", str(tmp_path / "s")], capsys)
