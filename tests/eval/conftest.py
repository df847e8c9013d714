"""Tiny teacher / student / window-baseline models shared by the evaluation tests (built in milliseconds)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
_spec = importlib.util.spec_from_file_location("_qwerky_tests_root", _ROOT_CONFTEST)
root = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(root)
tiny_teacher = root.tiny_teacher
build_tokenizer = root.build_tokenizer


@pytest.fixture(scope="session")
def tiny_models():
    """(teacher, student rwkv7, window baseline), all in eval mode."""
    from qwerky.surgery import convert_teacher

    teacher = tiny_teacher("qwen2")
    student = convert_teacher(teacher, mixer="rwkv7").eval()
    baseline = convert_teacher(teacher, mixer="window").eval()
    return teacher, student, baseline


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, tiny_models, tokenizer) -> Path:
    """A saved tiny converted model folder (what `qwerky convert` writes)."""
    from qwerky.surgery import save_student

    path = tmp_path_factory.mktemp("student")
    return save_student(tiny_models[1], tokenizer, path / "model")
