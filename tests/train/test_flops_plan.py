"""The FLOP formula against a hand count on a tiny config, and `qwerky plan`'s CPU mode and formatting."""

import json
from pathlib import Path

import pytest
import torch
import transformers as tf

from qwerky.cli import main
from qwerky.plan import human
from qwerky.surgery import convert_teacher
from qwerky.train.flops import FlopModel, rwkv7_core
from qwerky.train.memory import layer_activations, saved_bytes


def _tiny():
    """Llama, hidden 8, MLP 12, 2 layers, 2 query / 1 key-value heads of 4, vocabulary 16, LoRA ranks 2."""
    cfg = tf.LlamaConfig(hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=4, vocab_size=16, tie_word_embeddings=True)
    teacher = tf.AutoModelForCausalLM.from_config(cfg)
    student = convert_teacher(teacher, mixer="rwkv7", decay_rank=2, iclr_rank=2, value_rank=2, gate_rank=2)
    return teacher, student


def test_flops_hand_count() -> None:
    teacher, student = _tiny()
    fm = FlopModel.from_models(teacher, student)
    # attention q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192; MLP gate, up 8x12 and down 12x8 = 288; head 16x8
    assert fm.attention == [192, 192] and fm.mlp == [288, 288] and fm.head() == 2 * 128
    # mixers: the projections (192) + decay, in-context rate, gate LoRAs (8x2 + 2x8 each); layer 1 adds the
    # value-residual LoRA
    assert fm.mixers == [192 + 3 * 32, 192 + 4 * 32]
    T = 64  # one chunk: per token and head 9 c D + 4 D^2 + D^3 / c multiply-adds, c = 64, D = 4
    core = 2 * 2 * (9 * 64 * 4 + 4 * 16 + 64 / 64)
    assert rwkv7_core(T, 2, 4) == core == 9476
    teacher_layer = 2 * (192 + 288) + 4 * 2 * 4 * (T + 1) / 2  # projections + causal QK^T and AV
    mixers = (2 * 288 + core) + (2 * 320 + core)
    one = fm.step_flops(1, T)
    assert one["teacher_forward"] == 2 * teacher_layer  # no head in stage 1
    assert one["student_forward"] == mixers and one["student_backward"] == 2 * mixers
    assert one["recompute"] == 0 and one["total"] == 2 * teacher_layer + 3 * mixers
    assert fm.step_flops(1, T, recompute_mixers=True)["total"] == 2 * teacher_layer + 4 * mixers
    two = fm.step_flops(2, T, recompute_head=False)
    assert two["teacher_forward"] == 2 * teacher_layer + 256
    assert two["student_forward"] == mixers + 2 * 2 * 288 + 256
    # mixers train (2x), the frozen MLPs and head pass the gradient on (1x)
    assert two["student_backward"] == 2 * mixers + 2 * 2 * 288 + 256
    layers_again = fm.step_flops(2, T, recompute_head=True, recompute_layers=True)["recompute"]
    assert layers_again == 256 + mixers + 2 * 2 * 288
    three = fm.step_flops(3, T, recompute_head=False)
    assert three["student_backward"] == 2 * (mixers + 2 * 2 * 288 + 256)
    assert fm.step_flops(4, T, loss="ce", recompute_head=False)["teacher_forward"] == 0


def test_flops_padding_and_kept_attention() -> None:
    assert rwkv7_core(65, 1, 4) == pytest.approx(rwkv7_core(64, 1, 4) * 128 / 65)  # padded to whole chunks
    teacher, _ = _tiny()
    hybrid = convert_teacher(teacher, mixer="rwkv7", attention_layers=[0], decay_rank=2, iclr_rank=2,
                             value_rank=2, gate_rank=2)
    fm = FlopModel.from_models(teacher, hybrid)
    assert fm.converted == [False, True] and fm.mixers[0] == 192
    # stage 1 trains only layer 1; stage 2's backward starts at it (nothing below trains)
    assert fm.step_flops(1, 64)["student_forward"] == fm.mixer_forward(1, 64)
    two = fm.step_flops(2, 64, recompute_head=False)
    assert two["student_backward"] == 2 * fm.mixer_forward(1, 64) + 2 * 288 + 256


def test_human_counts() -> None:
    assert [human(n) for n in (400_000, 1_650_000, 100_000_000, 72.7e9, 512, 150_000)] == [
        "400k", "1.65M", "100M", "72.7B", "512", "150k"]


def test_saved_activations_measured_on_fake_tensors() -> None:
    """The plan's activation memory is what autograd keeps, counted once per storage, without memory used."""
    x = torch.randn(4, 8, requires_grad=True)
    lin = torch.nn.Linear(8, 8)
    # the linear's input and tanh's output; the weight (kept for x's gradient) is a parameter, not counted
    assert saved_bytes(lambda: torch.tanh(lin(x)), lin.parameters()) == 4 * 8 * 4 * 2
    assert saved_bytes(lambda: torch.tanh(lin(x))) == 4 * 8 * 4 * 2 + 8 * 8 * 4
    from qwerky.modeling.modeling_qwerky import QwerkyForCausalLM
    from qwerky.surgery.convert import student_config
    from qwerky.surgery.families import inspect_teacher
    from qwerky.teacher import teacher_skeleton

    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    skeleton = teacher_skeleton(cfg)
    with torch.device("meta"):
        student = QwerkyForCausalLM(student_config(skeleton, inspect_teacher(skeleton)))
    small, big = layer_activations(student, 1, 64), None
    with torch.device("meta"):
        student = QwerkyForCausalLM(student_config(skeleton, inspect_teacher(skeleton)))
    big = layer_activations(student, 2, 128)
    assert 0 < small["mixer"] < small["layer"]
    assert big["layer"] == pytest.approx(4 * small["layer"], rel=0.05)  # linear in tokens (chunked form)


def test_plan_cpu_mode(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--cpu` (or no --gpus on a machine without GPUs) plans this CPU: its RAM, the given or measured matmul
    rate, token counts written out (400k, not 0M), and says what it assumed."""
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json_string())
    out = tmp_path / "p.json"
    args = ["plan", "--teacher", str(path), "--cpu", "--ram", "24", "--cpu-gflops", "50", "--threads", "1",
            "--json", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| 1 | 400k | 256 |" in text and "0M" not in text
    assert "this CPU: 1 thread(s)" in text and "50 GFLOP/s (given)" in text
    plan = json.loads(out.read_text())
    assert plan["machine"] == "cpu" and plan["recipe"] == "default" and plan["ram_gb"] == 24.0
    for st in plan["stages"]:
        assert st["fits"] and st["memory_gib"] > 0.5
        rate = 50e9 * st["utilisation"] / st["flops_per_token"]
        assert st["seconds"] == pytest.approx(st["tokens"] / rate, rel=0.01)
    if not torch.cuda.is_available():  # no --gpus: this CPU, and it says so
        assert main(["plan", "--teacher", str(path), "--cpu-gflops", "50"]) == 0
        assert "no --gpus given and no GPU here: planning for this CPU" in capsys.readouterr().out
