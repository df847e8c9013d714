"""The assets shipped inside the package: the default teacher (``qwerky demo``) and its corpus.

These tests read only the package directory, never ``../shared``: a fresh offline install has them.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch

import qwerky

ASSETS = Path(qwerky.__file__).parent / "assets"
TEACHER = ASSETS / "teacher"
CORPUS = ASSETS / "corpus"


@pytest.fixture(scope="module")
def teacher():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TEACHER)


def _validation_text(n_docs: int = 3, n_chars: int = 3000) -> str:
    """The start of the first few held-out documents, joined by eos as in training."""
    with gzip.open(CORPUS / "python-docs-validation.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(next(f))["text"][:n_chars] for _ in range(n_docs)]
    return "<|endoftext|>".join(docs)


def test_files_shipped():
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "training.json"):
        assert (TEACHER / name).is_file(), name
    for name in ("python-docs-train.jsonl.gz", "python-docs-validation.jsonl.gz"):
        assert (CORPUS / name).is_file(), name
    assert (ASSETS / "NOTICE.md").is_file()
    assert (TEACHER / "model.safetensors").stat().st_size < 20 * 2**20


def test_teacher_is_qwen2_with_gqa_and_biases(teacher):
    cfg = teacher.config
    assert cfg.model_type == "qwen2"
    assert type(teacher).__name__ == "Qwen2ForCausalLM"
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.tie_word_embeddings
    attn = teacher.model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.bias is not None
        assert proj.bias.abs().max() > 0  # trained, not the zero initialisation
    assert attn.o_proj.bias is None


def test_tokenizer_special_tokens_and_chat_template(tokenizer, teacher):
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == teacher.config.eos_token_id
    assert len(tokenizer) == teacher.config.vocab_size
    for tok in ("<|im_start|>", "<|im_end|>"):
        assert len(tokenizer(tok, add_special_tokens=False)["input_ids"]) == 1
    text = "def f(x):\n    return x ** 2  # Ünïcode ok\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_teacher_perplexity_on_shipped_validation_corpus(teacher, tokenizer):
    ids = tokenizer(_validation_text(), return_tensors="pt", add_special_tokens=False)["input_ids"][:, :1024]
    assert ids.shape[1] >= 512
    with torch.no_grad():
        loss = teacher(input_ids=ids, labels=ids).loss.item()
    ppl = math.exp(loss)
    # random weights give ~4300 on this slice (about the vocabulary size); the shipped teacher gives
    # ~250 here (document headers are hard) and ~155 over the whole validation file
    assert ppl < 400, ppl


def test_training_record(teacher):
    record = json.loads((TEACHER / "training.json").read_text())
    assert record["tokens_seen"] > 0
    assert record["heldout_perplexity"] < 400
    assert record["model_config"]["num_key_value_heads"] == teacher.config.num_key_value_heads
