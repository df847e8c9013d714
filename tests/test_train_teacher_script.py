"""scripts/train_teacher.py's synthetic retrieval documents (the long-document teacher's mixture)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_teacher.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_teacher", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_retrieval_documents_state_the_key_before_asking_for_it() -> None:
    tt = _script()
    texts = [f"line of document {d}\n" * 400 for d in range(5)]
    docs = tt.retrieval_documents(texts, 20, seed=0, min_chars=300, max_chars=3000)
    assert len(docs) == 20
    assert docs == tt.retrieval_documents(texts, 20, seed=0, min_chars=300, max_chars=3000)  # deterministic
    names = set()
    for doc in docs:
        question = re.search(r"\nWhat is the ([a-z ]+)\? The \1 is (\d+)\.$", doc)
        assert question, doc[-120:]
        name, key = question.group(1), question.group(2)
        names.add(name)
        stated = re.search(rf"[Tt]he {name} is {key}\.", doc)
        assert stated and stated.start() < question.start()  # the answer is only recoverable by looking back
    assert len(names) > 1  # several key names, not one template


def test_many_facts_are_all_stated_and_asked() -> None:
    tt = _script()
    texts = [f"line of document {d}\n" * 400 for d in range(5)]
    for doc in tt.retrieval_documents(texts, 10, seed=1, min_chars=300, max_chars=3000, facts=4):
        asked = re.findall(r"\nWhat is the ([a-z ]+)\? The \1 is (\d+)\.", doc)
        assert len(asked) == 4 and len({name for name, _ in asked}) == 4
        first_question = doc.index("\nWhat is the")
        for name, key in asked:
            assert doc.index(f"The {name} is {key}.") < first_question
