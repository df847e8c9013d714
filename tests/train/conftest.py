"""Fixtures for pipeline tests: a tiny teacher folder and text that ships with qwerky (no ../shared needed)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

import qwerky

CORPUS = Path(qwerky.__file__).parent / "assets" / "corpus" / "python-docs-validation.jsonl.gz"


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
