"""Student -> one GGUF file that stock llama.cpp runs (architecture `arwkv7`; ollama, LM Studio and
llama-cpp-python load it too).

Only the `arwkv7` student exports: its mixer computes exactly llama.cpp's ARWKV7 time mix, and the rest
of the model (RMSNorm, SwiGLU MLP, head) is llama.cpp's ARWKV7 layout when the teacher is a Qwen2/Qwen3/
Llama/Mistral-style decoder. Every other student gets one line saying why it cannot run there (see
docs/gguf.md). Hyper-parameters and tensor names are those llama.cpp's own converter writes for ARWKV7
(`convert_hf_to_gguf.py`, class ARwkv7Model); the folds that keep the function exact are:

* the D^-0.5 read-out scale goes into the receptance weight;
* GQA key/value heads are expanded into full-width key/value weights (llama.cpp's r, k, v are C x C);
* the gate (1 + sigmoid(x G1) G2) becomes G2' sigmoid(G1' x) with one extra rank whose G1 row is zero
  (sigmoid(0) = 1/2) and whose G2 column is 2;
* layer 0's unused value-residual tensors are copies of its ICLR adapter (what llama.cpp's loader wants).

Quantisation is what gguf-py can do in Python: f32, f16, bf16, q8_0, q5_0, q5_1, q4_0, q4_1 (2-D weights
whose rows divide into blocks; norms, vectors, decay adapters and the token-shift mixes stay f32, as in
llama.cpp's converter; for 4/5-bit types the output head stays q8_0). The file is written to a temporary
sibling and renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwerky.errors import QwerkyError

EXPORTABLE_MIXER = "arwkv7"
EXPORTABLE_FAMILIES = ("qwen2", "qwen3", "llama", "mistral")
WKV_HEAD_MULTIPLE = 64  # ggml's wkv7 CPU loop has no tail for head sizes below its SIMD step (measured: 16 fails)

# Why each other student cannot run in llama.cpp's released graphs (one line each, shown by the CLI).
MIXER_BLOCKERS = {
    "rwkv7": "RAD-RWKV7 applies the teacher's RoPE to r/k inside the mixer, writes with the 'balanced' key "
             "k(1-w+a) and keeps the q/k/v biases and q/k norms; llama.cpp's rwkv7/arwkv7 graphs have none of these",
    "rwkv6": "RAD-RWKV6 reads the state before the decay (bonus u=1) and clamps the log-decay at -5; llama.cpp's "
             "rwkv6qwen2 graph (gated linear attention) decays first and does not clamp",
    "gated_deltanet": "llama.cpp has no graph for a Gated DeltaNet layer on a Qwen/Llama MLP stack",
    "window": "the window student is softmax attention over a sliding window with sinks plus an RWKV-7 branch; "
              "no llama.cpp architecture runs that",
}

QUANT_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1")

# Pre-tokenizer regexes of HF tokenizer.json -> llama.cpp's tokenizer.ggml.pre name.
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {_QWEN2_REGEX: "qwen2", _LLAMA3_REGEX: "llama-bpe"}


def export_blockers(student: Any) -> list[str]:
    """Reasons this student cannot run exactly in released llama.cpp (empty: it can)."""
    cfg = student.config
    teacher = cfg.teacher_config
    reasons = []
    if cfg.mixer != EXPORTABLE_MIXER:
        why = MIXER_BLOCKERS.get(cfg.mixer, f"mixer {cfg.mixer!r} has no llama.cpp graph")
        reasons.append(f"mixer {cfg.mixer!r}: {why}")
    if cfg.attention_layers:
        reasons.append(f"hybrid: layers {list(cfg.attention_layers)} keep softmax attention, and llama.cpp's arwkv7 "
                       "graph has recurrent layers only")
    if teacher.model_type not in EXPORTABLE_FAMILIES:
        reasons.append(f"teacher family {teacher.model_type!r}: llama.cpp's arwkv7 layout (RMSNorm, SwiGLU MLP, plain "
                       f"head) is that of {', '.join(EXPORTABLE_FAMILIES)} only")
    if cfg.num_heads * cfg.head_dim != cfg.hidden_size:
        reasons.append(f"heads x head_dim = {cfg.num_heads * cfg.head_dim} != hidden size {cfg.hidden_size}: "
                       "llama.cpp's arwkv7 time mix is hidden-size wide")
    if cfg.head_dim % WKV_HEAD_MULTIPLE:
        reasons.append(f"head_dim {cfg.head_dim} is not a multiple of {WKV_HEAD_MULTIPLE}: llama.cpp's SIMD wkv7 CPU "
                       "kernel steps 32 (AVX2) or 64 (AVX-512) floats at a time and reads past smaller heads")
    if getattr(teacher, "hidden_act", "silu") != "silu" or getattr(teacher, "mlp_bias", False):
        reasons.append("the MLP is not a bias-free SiLU SwiGLU, which llama.cpp's arwkv7 graph hard-codes")
    if cfg.lm_head_bias:
        reasons.append("the output head has a bias, which llama.cpp's arwkv7 graph lacks")
    return reasons


def check_exportable(student: Any) -> None:
    """Raise QwerkyError naming every reason the student cannot be exported, and what would export."""
    reasons = export_blockers(student)
    if reasons:
        raise QwerkyError("cannot export to GGUF: " + "; ".join(reasons) + f". Only the {EXPORTABLE_MIXER!r} student "
                          "(all layers recurrent; convert with --mixer arwkv7) runs in released llama.cpp")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().contiguous().numpy()


def gguf_tensors(student: Any) -> dict[str, np.ndarray]:
    """llama.cpp ARWKV7 tensor name -> float32 array (torch layout = GGUF's reversed ggml shape)."""
    check_exportable(student)
    cfg = student.config
    H, Hk, D, C = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    base = student.model
    out: dict[str, np.ndarray] = {
        "token_embd.weight": _np(base.embed_tokens.weight),
        "output_norm.weight": _np(base.norm.weight),
        "output.weight": _np(student.lm_head.weight),
    }
    for i, layer in enumerate(base.layers):
        m, mlp, p = layer.self_attn, layer.mlp, f"blk.{i}."
        expand = lambda w: w.view(Hk, D, C).repeat_interleave(H // Hk, dim=0).reshape(H * D, C)  # noqa: E731
        gate_down = torch.cat([m.gate_lora.down.weight, torch.zeros(1, C, dtype=m.gate_lora.down.weight.dtype)])
        gate_up = torch.cat([m.gate_lora.up.weight, torch.full((C, 1), 2.0, dtype=m.gate_lora.up.weight.dtype)], 1)
        if m.first_layer:  # unused by llama.cpp, but its loader wants them with the ICLR rank
            v0, v1, v2 = m.iclr_base, m.iclr_lora.down.weight, m.iclr_lora.up.weight
        else:
            v0, v1, v2 = m.value_mix_base, m.value_mix_lora.down.weight, m.value_mix_lora.up.weight
        tensors = {
            "attn_norm": layer.input_layernorm.weight,
            "time_mix_lerp_fused": m.shift.view(6, 1, 1, C),
            "time_mix_w0": m.decay_base, "time_mix_w1": m.decay_lora.down.weight,
            "time_mix_w2": m.decay_lora.up.weight,
            "time_mix_a0": m.iclr_base, "time_mix_a1": m.iclr_lora.down.weight, "time_mix_a2": m.iclr_lora.up.weight,
            "time_mix_v0": v0, "time_mix_v1": v1, "time_mix_v2": v2,
            "time_mix_g1": gate_down, "time_mix_g2": gate_up,
            "time_mix_k_k": m.key_removal, "time_mix_k_a": m.key_iclr, "time_mix_r_k": m.bonus.reshape(-1),
            "time_mix_receptance": m.receptance.weight * D**-0.5,
            "time_mix_key": expand(m.key.weight), "time_mix_value": expand(m.value.weight),
            "time_mix_output": m.output.weight,
            "ffn_norm": layer.post_attention_layernorm.weight,
            "ffn_gate": mlp.gate_proj.weight, "ffn_up": mlp.up_proj.weight, "ffn_down": mlp.down_proj.weight,
        }
        out.update({f"{p}{name}.weight": _np(t) for name, t in tensors.items()})
    return out


def _qtype(name: str, array: np.ndarray, quant: str) -> Any:
    """The GGML type of one tensor, with llama.cpp's converter's rules for what stays f32."""
    import gguf

    Q = gguf.GGMLQuantizationType
    keep_f32 = ("_norm.weight", "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_lerp_fused.weight")
    if array.ndim <= 1 or name.endswith(keep_f32) or quant == "f32":
        return Q.F32
    if quant.startswith(("q4", "q5")) and name == "output.weight":
        return Q.Q8_0
    return getattr(Q, quant.upper())


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1", "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1"}


def _tokenizer_entries(tokenizer_dir: Path, vocab_size: int) -> dict[str, Any]:
    """tokenizer.ggml.* as convert_hf_to_gguf's gpt2 path writes them, from the folder's tokenizer.json."""
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise QwerkyError(f"cannot export to GGUF: {tokenizer_dir} has no tokenizer.json (a byte-level BPE tokenizer "
                          "is needed for llama.cpp's gpt2 vocabulary)")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE" or _byte_level(tj) is None:
        raise QwerkyError("cannot export to GGUF: only byte-level BPE tokenizers (GPT-2/Qwen/Llama-3 style) are "
                          f"written; this one is {model.get('type')!r}")
    vocab: dict[str, int] = dict(model["vocab"])
    special = {t["content"]: t for t in tj.get("added_tokens", [])}
    for t in special.values():
        vocab[t["content"]] = t["id"]
    size = max(vocab_size, max(vocab.values()) + 1)
    by_id = {i: tok for tok, i in vocab.items()}
    tokens, types = [], []
    for i in range(size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # gguf.TokenType.UNUSED
        else:
            tokens.append(tok)
            types.append((3 if special[tok].get("special") else 4) if tok in special else 1)  # CONTROL/USER/NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    cfg = _read_json(tokenizer_dir / "tokenizer_config.json")
    ids = {name: vocab.get(_token_text(cfg.get(f"{name}_token"))) for name in ("bos", "eos", "pad", "unk")}
    return {"pre": _byte_level(tj), "tokens": tokens, "types": types, "merges": merges, "ids": ids,
            "add_bos": bool(cfg.get("add_bos_token", False)), "chat_template": cfg.get("chat_template")
            or _read_text(tokenizer_dir / "chat_template.jinja")}


def _byte_level(tj: dict[str, Any]) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, or None if not byte level."""
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if not any(p.get("type") == "ByteLevel" for p in parts):
        return None
    for p in parts:
        if p.get("type") == "ByteLevel" and p.get("use_regex", True):
            return "gpt-2"
        if p.get("type") == "Split":
            regex = (p.get("pattern") or {}).get("Regex")
            if regex in PRE_TOKENIZERS:
                return PRE_TOKENIZERS[regex]
    return "default"  # an unknown split regex: llama.cpp's default BPE pre-tokenizer (approximate)


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _read_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def export_gguf(student: Any, tokenizer_dir: str | Path, out: str | Path, quant: str = "f16",
                name: str = "qwerky-arwkv7") -> Path:
    """Write `student` (an arwkv7 QwerkyForCausalLM) and the tokenizer in `tokenizer_dir` as one GGUF file."""
    if quant not in QUANT_TYPES:
        raise QwerkyError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANT_TYPES)} (what gguf-py quantises "
                          "in Python; for k-quants run llama.cpp's llama-quantize on the f16 file)")
    check_exportable(student)
    try:
        import gguf
    except ImportError as exc:
        raise QwerkyError("qwerky export --format gguf needs the Python package 'gguf': "
                          "pip install gguf==0.19.0 (or qwerky[gguf])") from exc
    cfg, teacher = student.config, student.config.teacher_config
    tok = _tokenizer_entries(Path(tokenizer_dir), teacher.vocab_size)
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp_name, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.ARWKV7])
        w.add_name(name)
        w.add_context_length(1048576)  # RWKV isn't context limited (what llama.cpp's converter writes)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(teacher.num_hidden_layers)
        w.add_layer_norm_rms_eps(float(teacher.rms_norm_eps))
        w.add_wkv_head_size(cfg.head_dim)
        w.add_decay_lora_rank(cfg.decay_rank)
        w.add_iclr_lora_rank(cfg.iclr_rank)
        w.add_value_residual_mix_lora_rank(cfg.value_rank)
        w.add_gate_lora_rank(cfg.gate_rank + 1)  # + the constant rank that carries the gate's "1 +"
        w.add_feed_forward_length(teacher.intermediate_size)
        w.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES[quant])))
        w.add_token_shift_count(1)
        w.add_head_count(0)  # required by llama.cpp, unused
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tok["pre"])
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_token_merges(tok["merges"])
        ids = tok["ids"]
        eos = ids["eos"] if ids["eos"] is not None else getattr(teacher, "eos_token_id", None)
        for key, value in (("bos", ids["bos"] if ids["bos"] is not None else getattr(teacher, "bos_token_id", None)),
                           ("eos", eos), ("pad", ids["pad"]), ("unk", ids["unk"])):
            if isinstance(value, list):
                value = value[0]
            if value is not None:
                getattr(w, f"add_{key}_token_id")(int(value))
        w.add_add_bos_token(tok["add_bos"])
        if tok["chat_template"]:
            w.add_chat_template(tok["chat_template"])
        for tname, array in gguf_tensors(student).items():
            qtype = _qtype(tname, array, quant)
            try:
                data = gguf.quants.quantize(array, qtype)
            except gguf.QuantError:  # rows that do not divide into blocks: f16, as llama.cpp's converter does
                qtype = gguf.GGMLQuantizationType.F16
                data = gguf.quants.quantize(array, qtype)
            w.add_tensor(tname, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp_name, 0o666 & ~mask)  # mkstemp makes 0600; the model file should be like any other
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out


def export_gguf_folder(student_dir: str | Path, out: str | Path, quant: str = "f16") -> Path:
    """`qwerky export STUDENT --format gguf`: load the converted folder, check it, write the file."""
    from qwerky.model_paths import check_model_dir

    from .export import load_student

    folder = check_model_dir(student_dir, what="student")
    config = _read_json(folder / "config.json")
    if config.get("model_type") != "qwerky":
        raise QwerkyError(f"{folder} is not a converted qwerky student (config model_type "
                          f"{config.get('model_type')!r}); convert it first with `qwerky convert --mixer arwkv7`")
    student = load_student(folder)
    return export_gguf(student, folder, out, quant=quant, name=folder.name)
