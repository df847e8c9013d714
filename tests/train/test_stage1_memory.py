"""Stage 1's bounded-memory forms give the loss and gradients of the plain form: each mixer on the teacher's
recorded input (recomputed in backward, or its backward run right after its forward) equals the student's own
forward fed the teacher's stream, with nothing kept for backward."""

import pytest
import torch

from qwerky.surgery import convert_teacher, unshare_from_teacher
from qwerky.train.alignment import AlignmentTap, checkpoint_forward
from qwerky.train.losses import alignment_loss
from qwerky.train.recipe import StageSpec
from qwerky.train.stages import Stage1, TeacherTaps, make_loss_fn, recurrent_mixers, teacher_base, trainable_parameters
from qwerky_testing import tiny_teacher


def _student(teacher, mixer: str, attention_layers=()):
    student = convert_teacher(teacher, mixer=mixer, attention_layers=list(attention_layers))
    unshare_from_teacher(student, teacher, modules=student.mixers)
    params = trainable_parameters(1, student, StageSpec(loss="align"))
    with torch.no_grad():  # move the new parameters off their neutral start, so every path carries gradient
        g = torch.Generator().manual_seed(1)
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return student.train(), params


def _reference(student, teacher, ids):
    """The original form: the student's own forward, every mixer handing the teacher's output on, no recompute."""
    taps = TeacherTaps(teacher)
    try:
        with torch.no_grad():
            teacher_base(teacher)(input_ids=ids, use_cache=False)
    finally:
        taps.remove()
    mixers = recurrent_mixers(student)
    with AlignmentTap(mixers).feeding({i: r[2] for i, r in taps.records.items()}) as pairs:
        student.hidden_states(ids)
    return sum(alignment_loss(y, t) for y, t in pairs) / len(mixers)


def _grads(params):
    out = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return out


@pytest.mark.parametrize("mixer,attention_layers", [("rwkv7", ()), ("arwkv7", (1,)), ("window", ()),
                                                    ("gated_deltanet", ())])
def test_stage1_forms_equal_plain_forward(mixer: str, attention_layers: tuple) -> None:
    torch.manual_seed(0)
    teacher = tiny_teacher("llama", num_hidden_layers=3).requires_grad_(False)
    student, params = _student(teacher, mixer, attention_layers)
    ids = torch.randint(1, 384, (2, 40), generator=torch.Generator().manual_seed(2))

    ref = _reference(student, teacher, ids)
    ref.backward()
    g_ref = _grads(params)
    assert sum(float(g.abs().sum()) for g in g_ref) > 0

    taps = TeacherTaps(teacher)
    try:
        results = {}
        for recompute in (False, True):  # one graph, each mixer recomputed in backward or not
            loss = make_loss_fn(1, StageSpec(loss="align"), student, teacher, taps, recompute=recompute)(ids)
            loss.backward()
            results[f"loss recompute={recompute}"] = (loss.detach(), _grads(params))
        step = Stage1(student, teacher, taps).step(ids, 0.5)  # mixer by mixer, weighted
        results["step"] = (step * 2, [g * 2 for g in _grads(params)])
        assert not taps.records and student.ctx.v_first is None  # nothing kept after the step
    finally:
        taps.remove()
    for name, (loss, grads) in results.items():
        assert torch.allclose(loss, ref.detach(), rtol=1e-5, atol=1e-7), name
        for g, r in zip(grads, g_ref):
            assert torch.allclose(g, r, rtol=1e-4, atol=1e-6), (name, (g - r).abs().max())


def test_checkpoint_forward_recomputes_in_backward() -> None:
    """Within `checkpoint_forward` the mixers' internals are not kept for backward (fewer saved tensors), the
    gradients are the same, and the modules are left as they were."""
    torch.manual_seed(0)
    teacher = tiny_teacher("llama", num_hidden_layers=2).requires_grad_(False)
    student, params = _student(teacher, "rwkv7")
    ids = torch.randint(1, 384, (2, 40), generator=torch.Generator().manual_seed(3))

    def saved_bytes(fn):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn()
        return loss, total[0]

    loss, plain = saved_bytes(lambda: _reference(student, teacher, ids))
    loss.backward()
    g_plain = _grads(params)
    mixers = recurrent_mixers(student)
    with checkpoint_forward(mixers):
        loss, recomputed = saved_bytes(lambda: _reference(student, teacher, ids))
    loss.backward()
    assert recomputed < plain / 4
    for g, r in zip(_grads(params), g_plain):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-6)
    assert all("forward" not in vars(m) for m in mixers)
