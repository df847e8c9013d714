"""Builders shared by the tests: tiny teachers of several families and a small offline BPE tokenizer.

Everything here is built in milliseconds from configs; nothing is downloaded.
"""

from __future__ import annotations

import torch

_TEXT = (
    "The quick brown fox jumps over the lazy dog. A recurrent model keeps a fixed-size state. "
    "Attention looks back at every token; the state summarises them. def add(a, b): return a + b\n"
    "Python lists, dicts and sets are containers. The pass key is 12345. Remember it. "
    "One of the special magic numbers for apple-tree is: 7654321. What is the pass key? "
) * 4


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on a fixed paragraph, wrapped as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([_TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def tiny_config(family: str = "qwen2", vocab_size: int = 384, **overrides):
    """A 2-layer, hidden-64 config of a supported family (GQA 4 query / 2 key-value heads)."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    common.update(overrides)
    cls = {
        "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config, "llama": tf.LlamaConfig,
        "mistral": tf.MistralConfig,
    }[family]
    if family == "qwen3":
        common.setdefault("head_dim", 16)
    return cls(**common)


def tiny_teacher(family: str = "qwen2", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    model.eval()
    return model
