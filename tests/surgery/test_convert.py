"""Stage-0 surgery: weights land where the method says, nothing is dropped, unknown layouts fail clearly."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from qwerky.surgery import UnsupportedArchitectureError, convert_teacher, unshare_from_teacher
from qwerky_testing import tiny_teacher


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama", "mistral"])
def test_weight_transfer(family: str) -> None:
    teacher = tiny_teacher(family, attention_bias=True) if family != "qwen2" else tiny_teacher(family)
    student = convert_teacher(teacher)
    for i, layer in enumerate(teacher.model.layers):
        attn, mixer = layer.self_attn, student.model.layers[i].self_attn
        for src, dst in (("q_proj", "receptance"), ("k_proj", "key"), ("v_proj", "value"), ("o_proj", "output")):
            a, b = getattr(attn, src), getattr(mixer, dst)
            assert torch.equal(a.weight, b.weight)
            assert (a.bias is None) == (b.bias is None)
            if a.bias is not None:
                assert torch.equal(a.bias, b.bias)
        assert mixer.key.weight.shape[0] == 2 * 16  # GQA: key/value keep the teacher's 2 kv heads
        if family == "qwen3":
            assert torch.equal(mixer.r_norm.weight, attn.q_norm.weight)
            assert torch.equal(mixer.k_norm.weight, attn.k_norm.weight)
        # everything else is the teacher's own tensor, shared
        assert layer.mlp.up_proj.weight.data_ptr() == student.model.layers[i].mlp.up_proj.weight.data_ptr()
    assert student.model.embed_tokens.weight.data_ptr() == teacher.model.embed_tokens.weight.data_ptr()
    t_keys = {k for k in teacher.state_dict() if ".self_attn." not in k}
    s_keys = set(student.state_dict())
    assert t_keys <= s_keys


def test_unshare_keeps_teacher_intact() -> None:
    teacher = tiny_teacher("qwen2")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = convert_teacher(teacher)
    assert unshare_from_teacher(student, teacher) > 0
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("config", [
    tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2),
    tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  is_decoder=True),
], ids=["gpt2", "bert"])
def test_unsupported_architecture_names_module_and_families(config: tf.PretrainedConfig) -> None:
    model = tf.AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitectureError) as err:
        convert_teacher(model)
    msg = str(err.value)
    assert config.model_type in msg and "Attention" in msg and "Qwen2" in msg and "\n" not in msg


@pytest.mark.parametrize("cls", [tf.GemmaConfig, tf.GraniteConfig, tf.StableLmConfig, tf.Olmo2Config],
                         ids=["gemma", "granite", "stablelm", "olmo2"])
def test_families_outside_the_named_four_convert(cls: type) -> None:
    config = cls(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    teacher = tf.AutoModelForCausalLM.from_config(config).eval()
    x = torch.randint(0, 384, (1, 24))
    with torch.no_grad():
        window = convert_teacher(teacher, mixer="window")(x).logits  # T < W: must equal the teacher exactly
        assert (window - teacher(x).logits).abs().max() < 1e-4
        student = convert_teacher(teacher)
        state = student.init_state(1)
        steps = torch.cat([student(x[:, i:i + 1], past_key_values=state, use_cache=True).logits for i in range(24)], 1)
        assert (steps - student(x).logits).abs().max() < 1e-4
