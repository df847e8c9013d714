"""Optimizer groups: the window mixer's zero-initialised gates can get a larger learning rate."""

from __future__ import annotations

from qwerky.surgery import convert_teacher
from qwerky.train.recipe import StageSpec
from qwerky.train.stages import optimizer_groups, trainable_parameters
from qwerky_testing import tiny_teacher


def test_gate_parameters_get_scaled_lr() -> None:
    student = convert_teacher(tiny_teacher("qwen2"), mixer="window")
    spec = StageSpec(lr=1e-3, gate_lr_scale=10.0)
    params = trainable_parameters(2, student, spec)
    groups = optimizer_groups(student, params, spec)
    assert len(groups) == 2
    names = {id(p): n for n, p in student.named_parameters()}
    gate_names = {names[id(p)].rsplit(".", 1)[-1] for p in groups[1]["params"]}
    assert gate_names == {"branch_gate", "window_scale"}
    assert len(groups[1]["params"]) == 2 * student.config.num_hidden_layers
    assert groups[1]["lr"] == 1e-2
    assert sum(len(g["params"]) for g in groups) == len(params)  # every trainable parameter, once


def test_default_is_one_group() -> None:
    student = convert_teacher(tiny_teacher("qwen2"), mixer="window")
    spec = StageSpec()
    params = trainable_parameters(3, student, spec)
    assert optimizer_groups(student, params, spec) == [{"params": params}]
