"""Fixtures for pipeline tests: a tiny teacher folder and text that ships with qwerky (no ../shared needed)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

import qwerky

CORPUS = Path(qwerky.__file__).parent / "assets" / "corpus" / "python-docs-validation.jsonl.gz"

TINY = [
    "stage1.tokens=1024", "stage1.batch_size=4", "stage1.seq_len=64", "stage1.warmup_steps=1",
    "stage2.tokens=1024", "stage2.batch_size=4", "stage2.seq_len=64", "stage2.warmup_steps=1",
    "stage3.tokens=1024", "stage3.batch_size=4", "stage3.seq_len=64", "stage3.warmup_steps=1",
    "stage4.tokens=1024", "stage4.batch_size=2", "stage4.seq_len=128", "stage4.warmup_steps=1",
    "data.eval_seq_len=64", "data.eval_windows=4", "train.threads=1",
]


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dozen real documents (the embedded corpus), as a .jsonl file."""
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    with gzip.open(CORPUS, "rt") as f, open(path, "w") as out:
        for i, line in enumerate(f):
            if i == 12:
                break
            out.write(json.dumps({"text": json.loads(line)["text"][:6000]}) + "\n")
    return path
