"""Stage 0's per-head output scales: a converted layer's output stays near its attention's on a teacher whose
attention is as sharp as a real pretrained model's (large q.k), where plain weight transfer blows it up."""

import pytest
import torch

from qwerky.eval.quality import compare_models
from qwerky.surgery import convert_teacher
from qwerky.train.alignment import AlignmentTap
from qwerky.train.stages import TeacherTaps, recurrent_mixers, teacher_base
from qwerky.train.warm_start import fit_output_scales, nonnegative_least_squares
from qwerky_testing import tiny_teacher

QK_GAIN = 25.0  # random init has attention logits near 0; real teachers' reach 10-30


def sharp_teacher(family: str = "llama", layers: int = 3):
    """A tiny teacher with real-model-like attention: q and k weights scaled so logits are ~10-30."""
    teacher = tiny_teacher(family, num_hidden_layers=layers)
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.self_attn.q_proj.weight.mul_(QK_GAIN)
            layer.self_attn.k_proj.weight.mul_(QK_GAIN)
    return teacher


def layer_errors(student, teacher, ids):
    """Relative error of each mixer's output to its attention's, every layer fed the teacher's input."""
    taps = TeacherTaps(teacher)
    with torch.no_grad():
        teacher_base(teacher)(input_ids=ids, use_cache=False)
        taps.remove()
        with AlignmentTap(recurrent_mixers(student)).feeding({i: r[2] for i, r in taps.records.items()}) as pairs:
            student.hidden_states(ids)
    return [float((y - t).norm() / t.norm()) for y, t in pairs]


def tokens(seed: int, rows: int = 4, length: int = 96) -> torch.Tensor:
    return torch.randint(1, 384, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mixer", ["rwkv7", "arwkv7", "rwkv6", "gated_deltanet"])
def test_each_converted_layer_stays_near_its_attention(mixer):
    teacher = sharp_teacher()
    student = convert_teacher(teacher, mixer=mixer)
    held_out = tokens(1)
    before = layer_errors(student, teacher, held_out)
    report = fit_output_scales(student, teacher, tokens(0))
    after = layer_errors(student, teacher, held_out)
    assert sorted(report) == [0, 1, 2]
    for r in report.values():  # on the rows it was fitted on, never worse than a zero output
        assert r["rel_error_after"] <= 1.0 + 1e-6
        assert r["rel_error_after"] <= r["rel_error_before"] + 1e-6
    assert all(e < 1.0 for e in after), f"{mixer}: held-out relative error per layer {after}"
    assert sum(after) < sum(before)


def test_the_sharp_teacher_is_the_case_that_breaks_plain_transfer():
    """The premise: without the fit, rwkv7's transferred layers overshoot their attention (as on SmolLM2)."""
    teacher = sharp_teacher()
    student = convert_teacher(teacher, mixer="rwkv7")
    assert max(layer_errors(student, teacher, tokens(1))) > 1.5


def test_fit_improves_end_to_end_kl_and_leaves_the_teacher_alone():
    teacher = sharp_teacher(layers=3)
    o_before = [layer.self_attn.o_proj.weight.clone() for layer in teacher.model.layers]
    student = convert_teacher(teacher, mixer="rwkv7")
    windows = tokens(2, rows=4, length=64)
    kl0 = compare_models(teacher, student, windows)["student"]["kl"]
    fit_output_scales(student, teacher, tokens(0))
    kl1 = compare_models(teacher, student, windows)["student"]["kl"]
    assert kl1 < kl0
    for layer, w in zip(teacher.model.layers, o_before):
        assert torch.equal(layer.self_attn.o_proj.weight, w)
    assert all(m.output.weight.data_ptr() != layer.self_attn.o_proj.weight.data_ptr()
               for m, layer in zip(student.mixers, teacher.model.layers))


def test_window_student_starts_exact_and_is_not_rescaled():
    teacher = sharp_teacher(family="qwen2", layers=2)
    student = convert_teacher(teacher, mixer="window")
    ids = tokens(3, rows=2, length=32)
    with torch.no_grad():
        y0 = student(ids).logits
        assert fit_output_scales(student, teacher, ids) == {}
        assert torch.equal(student(ids).logits, y0)


def test_nonnegative_least_squares_matches_brute_force():
    torch.manual_seed(0)
    a = torch.randn(40, 5, dtype=torch.float64)
    truth = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    b = a @ truth + 0.01 * torch.randn(40, dtype=torch.float64)
    s = nonnegative_least_squares(a.T @ a, a.T @ b)
    assert (s >= 0).all() and s[1] == 0

    def cost(x):
        return float((a @ x - b).pow(2).sum())

    best = min(cost(torch.linalg.lstsq(a[:, list(keep)], b).solution.new_zeros(5).index_put_(
        (torch.tensor(keep),), torch.linalg.lstsq(a[:, list(keep)], b).solution))
        for keep in [(0, 2, 3, 4), (0, 2, 4), (0, 4), (0, 3, 4)]
        if (torch.linalg.lstsq(a[:, list(keep)], b).solution >= 0).all())
    assert cost(s) <= best + 1e-9
