"""Automatic hybrid layer choice after stage 1: greedy on held-out KL (every other layer converted), the
one-at-a-time cost of each layer, the curve K = 0, 1, ... against a random choice and memory at 8k."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_fixtures import TINY

from qwerky.cli import main
from qwerky.surgery import convert_teacher
from qwerky.train.hybrid import (
    choose,
    converted,
    curve,
    greedy_choice,
    greedy_search,
    layer_costs,
    parse_keep_attention,
)
from qwerky_testing import tiny_teacher


def test_the_costliest_layer_is_found_and_kept() -> None:
    teacher = tiny_teacher("llama", num_hidden_layers=3)
    student = convert_teacher(teacher, mixer="rwkv7")
    windows = torch.randint(0, 384, (4, 24))
    with torch.no_grad():
        for p in student.mixers[2].parameters():
            p.add_(torch.randn_like(p) * 0.5)  # layer 2's mixer is far worse than the others
    costs = layer_costs(teacher, student.mixers, windows)
    assert max(range(3), key=lambda i: costs[i]) == 2 and choose(costs, 1) == [2]
    greedy = greedy_choice(teacher, student.mixers, windows, 1)
    assert greedy[0]["layers"] == [2] and set(greedy[0]["candidates"]) == {"0", "1", "2"}
    rows = curve(teacher, student.mixers, windows, costs, bytes_per_token_per_layer=100.0, state_bytes_per_layer=5.0,
                 greedy=greedy)
    assert [r["keep"] for r in rows] == [0, 1, 2] and rows[0]["auto"]["layers"] == []
    assert rows[1]["auto"]["layers"] == [2] and rows[1]["auto"]["kl"] < rows[0]["auto"]["kl"]
    assert rows[1]["auto"]["kl"] <= rows[1]["random"]["kl"] + 1e-9 and "auto" not in rows[2]
    assert rows[1]["ranked"]["layers"] == [2]
    assert rows[1]["memory_bytes_at_8k"] == 100.0 * 8192 + 2 * 5.0
    with converted(teacher, {}), torch.no_grad():  # no layer converted: the teacher itself
        assert torch.equal(teacher(windows).logits, teacher(windows).logits)


@pytest.mark.parametrize("text,needle", [("auto", "auto:K"), ("first:2", "auto:K"), ("auto:4", "keep fewer")])
def test_keep_attention_parse_errors(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_keep_attention(text, num_layers=4)


def test_convert_keep_attention_auto_exports_a_hybrid(teacher_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "hy"
    sets = [x for s in TINY for x in ("--set", s)]
    assert main(["convert", "--teacher", str(teacher_dir), "--data", str(text_file), "--out", str(out), *sets,
                 "--stages", "1,2", "--keep-attention", "auto:1"]) == 0
    report = json.loads((out / "report.json").read_text())
    hy = report["hybrid"]
    config = json.loads((out / "config.json").read_text())
    assert len(hy["layers"]) == 1 and config["attention_layers"] == hy["layers"]
    # the greedy step kept the candidate with the lowest KL, and the curve's K=1 "auto" row is that choice
    step = hy["greedy"][0]
    assert hy["layers"] == [step["added"]] == [int(min(step["candidates"], key=step["candidates"].get))]
    assert hy["curve"][1]["auto"]["layers"] == hy["layers"]
    assert [r["keep"] for r in hy["curve"]] == list(range(config["num_hidden_layers"]))
    memory = [r["memory_bytes_at_8k"] for r in hy["curve"]]
    assert memory == sorted(memory) and memory[1] > memory[0]
    assert "## Hybrid" in (out / "report.md").read_text()
    # the exported hybrid loads without qwerky; its kept layer's cache grows, the rest stay fixed
    check = ("import sys, torch; from transformers import AutoModelForCausalLM; "
             "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval(); "
             "s = m.init_state(1); m(torch.tensor([[5, 6, 7]]), past_key_values=s, use_cache=True); a = s.nbytes(); "
             "m(torch.tensor([[8] * 50]), past_key_values=s, use_cache=True); "
             "print('GROWS', s.nbytes() > a, type(m.model.layers[int(sys.argv[2])].self_attn).__name__)")
    res = subprocess.run([sys.executable, "-c", check, str(out), str(hy["layers"][0])], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("GROWS ", 1)[1].split() == ["True", "AttentionMixer"]


def test_a_hybrid_resumed_after_stage_1_ends_as_the_uninterrupted_run(teacher_dir: Path, text_file: Path,
                                                                      tmp_path: Path) -> None:
    """Resumed from stage 1's end, the student is rebuilt as the chosen hybrid and takes the checkpoint's weights
    (which hold the mixers of the converted layers; the kept layer's mixer went with the rebuild)."""
    from safetensors.torch import load_file

    from qwerky.train.checkpoint import CheckpointManager

    out = tmp_path / "hy"
    args = ["convert", "--teacher", str(teacher_dir), "--data", str(text_file), "--out", str(out),
            *[x for s in TINY for x in ("--set", s)], "--stages", "1,2", "--keep-attention", "auto:1"]
    assert main(args) == 0
    first = load_file(out / "model.safetensors")
    assert CheckpointManager(tmp_path / "hy.run" / "checkpoints").drop(lambda tag: tag == "stage2-done")
    assert main([*args, "--resume"]) == 0
    again = load_file(out / "model.safetensors")
    assert set(first) == set(again) and all(torch.equal(first[k], again[k]) for k in first)


def test_greedy_search_finds_what_a_one_at_a_time_ranking_misses() -> None:
    """Layers 0 and 1 are each costly to convert alone, but their errors cancel when both are converted;
    layer 2 is mildly bad. The one-at-a-time ranking keeps 0 (leaving 1's error uncancelled); the greedy
    search, scoring the model with every other layer converted, keeps 2, then the best pair."""
    def kl(kept: set[int]) -> float:
        converted_layers = {0, 1, 2} - kept
        err = 0.3 * (2 in converted_layers)
        if (0 in converted_layers) != (1 in converted_layers):  # one of the pair alone: its error shows
            err += 2.0
        return err

    costs = [kl({1, 2}), kl({0, 2}), kl({0, 1})]  # converting each layer alone
    assert choose(costs, 1) in ([0], [1]) and kl(set(choose(costs, 1))) > 2.0
    steps = greedy_search(3, 2, lambda kept: (kl(kept), 0.0))
    assert steps[0]["added"] == 2 and steps[0]["kl"] == 0.0 and set(steps[0]["candidates"]) == {"0", "1", "2"}
    assert steps[1]["layers"] in ([0, 2], [1, 2]) and steps[1]["kl"] == 2.0 and len(steps[1]["candidates"]) == 2
