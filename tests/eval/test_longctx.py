"""Long-context generators (sizes and depths in model tokens), scoring, and `qwerky longctx` end to end."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from qwerky.eval.longctx import TASKS, USES_DEPTH, effective_length, make_samples, passkey_match, string_match_all
from qwerky.eval.longctx.common import count


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [400, 1000])
def test_prompt_length_within_one_unit(tokenizer, task, length):
    for s in make_samples(task, tokenizer, [length], [0.0, 0.5, 1.0], 1, seed=3):
        n = count(tokenizer, s.prompt)
        assert n == s.n_tokens
        assert length - s.unit_tokens <= n <= length, (n, s.unit_tokens)
        for ans in s.answers:
            assert ans in s.prompt or task == "fwe"


@pytest.mark.parametrize("task", ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "vt"])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_needle_at_requested_depth(tokenizer, task, depth):
    (s,) = make_samples(task, tokenizer, [1200], [depth], 1, seed=1)
    target = s.extra.get("target_token", s.needle_tokens[0])
    # tokens of the prompt before the filler begins (the task prefix and its newline)
    start = count(tokenizer, s.prompt[:s.prompt.index("\n") + 1])
    before = target - start
    if task in ("niah_multikey", "niah_multivalue"):
        # other needles placed before the target add their own tokens: take them out
        head = s.prompt[s.prompt.index("\n") + 1:]
        needle = re.compile(r"One of the special magic numbers for \S+ is: \d+\. ?")
        cut = [m for m in needle.finditer(head)]
        target_key = f"for {s.extra['key']} is: {s.answers[0]}."
        text = head[:next(m.start() for m in cut if target_key in m.group())]
        before = count(tokenizer, needle.sub("", text))
    assert abs(before - depth * s.filler_tokens) <= s.unit_tokens


def test_samples_are_seeded(tokenizer):
    a = make_samples("niah_single", tokenizer, [500], [0.5], 2, seed=7)
    b = make_samples("niah_single", tokenizer, [500], [0.5], 2, seed=7)
    c = make_samples("niah_single", tokenizer, [500], [0.5], 2, seed=8)
    assert [s.prompt for s in a] == [s.prompt for s in b] != [s.prompt for s in c]
    assert a[0].prompt != a[1].prompt


def test_too_short_length_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="shorter than the task's fixed text"):
        make_samples("niah_single", tokenizer, [40], [0.5], 1)


def test_scorers():
    assert string_match_all(" The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert string_match_all("only 1234567", ["1234567", "7654321"]) == 0.5
    assert string_match_all("VAR abcde", ["ABCDE"]) == 1.0  # case-insensitive
    assert string_match_all("nothing", ["1234567"]) == 0.0
    assert passkey_match(" 31415. Remember", "31415") == 1.0
    assert passkey_match(" 27 then 31415", "31415") == 0.0  # only the first integer counts
    assert passkey_match(" no digits", 5) == 0.0
    assert effective_length([1, 2, 4, 8], [100, 90, 50, 95]) == 2
    assert effective_length([1, 2], [10, 95]) is None


def test_fwe_answers_are_the_most_frequent(tokenizer):
    (s,) = make_samples("fwe", tokenizer, [600], [0.5], 1)
    words = s.prompt.split("\n")[1].split()
    counts = {w: words.count(w) for w in set(words)}
    top = sorted(counts.values(), reverse=True)[:3]
    assert sorted((counts[a] for a in s.answers), reverse=True) == top
    assert "fwe" not in USES_DEPTH and s.depth is None


def test_longctx_cli_end_to_end(tiny_models, tokenizer, teacher_dir, student_dir, tmp_path, capsys):
    from qwerky.eval.cli import add_longctx_arguments, longctx_main

    parser = add_longctx_arguments(argparse.ArgumentParser())
    out = tmp_path / "lc" / "passkey.json"
    args = parser.parse_args([str(student_dir), "--teacher", str(teacher_dir), "--task", "passkey",
                              "--lengths", "160,256", "--depths", "2", "--samples", "2", "--max-new-tokens", "3",
                              "--json", str(out), "--plot-dir", str(tmp_path / "lc"), "--device", "cpu"])
    assert longctx_main(args) == 0
    result = json.loads(out.read_text())
    assert set(result["models"]) == {"teacher", "student", "baseline"}
    for m in result["models"].values():
        assert len(m["acc"]) == 2 and len(m["acc"][0]) == 2 and len(m["records"]) == 8
        assert all(0 <= r["score"] <= 1 for r in m["records"])
    for name in ("teacher", "student", "baseline"):
        assert (tmp_path / "lc" / f"passkey_{name}.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "teacher" in printed and "baseline" in printed and "eff.len" in printed


def test_batched_generation_equals_one_by_one(tiny_models, tokenizer):
    from qwerky.eval.models import greedy_generate, greedy_generate_many

    _, student, _ = tiny_models
    prompts = [tokenizer.encode(t) for t in ["The pass key is", "A recurrent model keeps a fixed-size state. The"]]
    many = greedy_generate_many(student, prompts, 4, batch_size=2, prefill_chunk=8)
    assert many == [greedy_generate(student, p, 4) for p in prompts]
