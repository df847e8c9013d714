"""Shared fixtures (builders in qwerky_testing.py): a tiny tokenizer and a saved tiny teacher folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from qwerky_testing import build_tokenizer, tiny_teacher

torch.set_num_threads(int(os.environ.get("QWERKY_TEST_THREADS", "2")))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny Qwen2 teacher folder with tokenizer, as a user would pass to `qwerky convert`."""
    path = tmp_path_factory.mktemp("teacher-qwen2")
    tiny_teacher("qwen2").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
