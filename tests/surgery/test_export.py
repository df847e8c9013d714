"""The exported folder loads in a fresh process with plain transformers and generates with a fixed-size state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qwerky.modeling.mixer_base import get_mixer, mixer_names
from qwerky.surgery import convert_teacher, load_student, save_student
from qwerky_testing import build_tokenizer, tiny_teacher

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "window-student-2026-11"  # exported before mixer_options

CHECK = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
assert not any(m.startswith("qwerky") for m in sys.modules), "qwerky must not be imported"
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
ids = tok("The pass key is", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
with torch.no_grad():
    argmax = model(out).logits[:, ids.shape[1] - 1:-1].argmax(-1)
short, long = model.init_state(1), model.init_state(1)
with torch.no_grad():
    for n, state in ((10, short), (1000, long)):
        for _ in range(n):
            model(torch.tensor([[5]]), past_key_values=state, use_cache=True)
result = {"match": bool((argmax == out[:, ids.shape[1]:]).all()), "new": out.shape[1] - ids.shape[1],
          "short": short.nbytes(), "long": long.nbytes(), "cls": type(model).__name__}
print("\nRESULT " + json.dumps(result))
"""


BRANCH = {"branch_rope": True, "branch_center_keys": True, "branch_decay_init": [-9, -3]}
FAMILIES = ["qwen3", "llama", "mistral", "qwen2"]
# every registered mixer, each on another family, plus the window student with non-default options
CASES = [(FAMILIES[i % len(FAMILIES)], m, {}) for i, m in enumerate(mixer_names())] + [("qwen2", "window", BRANCH)]


@pytest.mark.parametrize("family,mixer,options", CASES)
def test_fresh_process_load_generate_and_constant_state(tmp_path: Path, family: str, mixer: str,
                                                        options: dict) -> None:
    import torch

    out = tmp_path / "student"
    student = convert_teacher(tiny_teacher(family), mixer=mixer, mixer_options=options)
    if options:  # every branch option in use, and the branch made to matter (its gate is 0 at conversion)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    save_student(student, build_tokenizer(), out)
    cfg = json.loads((out / "config.json").read_text())
    module = get_mixer(mixer).__module__.rpartition(".")[2]  # the mixer's module is the entry point
    assert cfg["auto_map"]["AutoModelForCausalLM"] == f"{module}.QwerkyForCausalLM"
    assert (out / f"{module}.py").exists() and cfg["mixer_options"] == get_mixer(mixer).Options.parse(options).to_dict()
    assert (out / "modeling_qwerky.py").exists() and (out / "model.safetensors").exists()
    res = subprocess.run([sys.executable, "-c", CHECK, str(out)], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(res.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["match"] and result["new"] == 32
    assert result["short"] == result["long"]


def test_roundtrip_weights_and_logits(tmp_path: Path) -> None:
    import torch

    student = convert_teacher(tiny_teacher("qwen3"), mixer="rwkv7")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_student(student, build_tokenizer(), tmp_path / "s")
    loaded = load_student(tmp_path / "s")
    x = torch.randint(0, 384, (2, 33))
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, student(x).logits, atol=1e-5)


def test_export_is_atomic_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "student"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    class Broken:
        def save_pretrained(self, *a: object, **k: object) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_student(convert_teacher(tiny_teacher("qwen2")), Broken(), out)
    assert (out / "keep.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["student"]


def test_folder_exported_before_mixer_options_still_loads(tmp_path: Path) -> None:
    """A window student exported by the previous layout (flat branch_* fields, its own copy of the old
    code): qwerky's current classes load it and give the logits its own code gave, and its own code
    still loads it with trust_remote_code."""
    import torch

    ref = json.loads((LEGACY / "reference.json").read_text())
    x = torch.tensor(ref["input_ids"])
    model = load_student(LEGACY)
    assert model.config.mixer_options["branch_center_keys"] is True and model.config.mixer_options["window_size"] == 8
    with torch.no_grad():
        logits = model(x).logits
    assert torch.allclose(logits[0, :, :8], torch.tensor(ref["logits_head"]), atol=1e-4)
    assert logits.argmax(-1).tolist() == ref["argmax"]
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True); "
            "print('ARGMAX', m(torch.tensor(" + json.dumps(ref["input_ids"]) + ")).logits.argmax(-1).tolist())")
    res = subprocess.run([sys.executable, "-c", code, str(LEGACY)], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("ARGMAX ", 1)[1].strip() == str(ref["argmax"])
