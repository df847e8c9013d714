"""Fixtures for the serving tests: tiny saved student/teacher folders and live loopback servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_helpers import LiveServer, build_tokenizer, start_server, tiny_teacher


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qwerky.surgery import convert_teacher, save_student

    path = tmp_path_factory.mktemp("serve") / "student"
    save_student(convert_teacher(tiny_teacher("qwen2"), mixer="rwkv7"), build_tokenizer(), path)
    return path


@pytest.fixture(scope="session")
def hf_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "teacher"
    tiny_teacher("qwen2").save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def live_student(student_dir: Path) -> Iterator[LiveServer]:
    with start_server(student_dir, "--max-concurrent", "64", "--max-prompt-tokens", "300",
                      "--max-tokens-limit", "1000000") as server:
        yield server


@pytest.fixture(scope="module")
def live_teacher(hf_teacher_dir: Path) -> Iterator[LiveServer]:
    with start_server(hf_teacher_dir, "--max-concurrent", "4") as server:
        yield server
