"""A new student mixer is one file: registered from inside this test (nothing else edited), it converts,
trains through the stage-1/2 losses, exports, loads in a fresh process with trust_remote_code and serves.

The throw-away mixer is a decaying linear attention with one learned decay per head, written to a
folder that joins `qwerky.modeling` the way QWERKY_MIXER_PATH does for a user's research mixer."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import qwerky.modeling as modeling_pkg
from qwerky.modeling.mixer_base import MIXERS, get_mixer, mixer_names, unregister_mixer

TOY = '''
"""A throw-away student: decaying linear attention, S <- w S + k v^T, o = S^T q."""

from dataclasses import dataclass

import torch
from torch import nn

from .layers_common import repeat_heads, take_projections
from .mixer_base import Mixer, MixerOptions, option, register_mixer


@dataclass
class ToyOptions(MixerOptions):
    decay_init: float = option(-1.0, "starting decay logit of every head")


@register_mixer
class ToyMixer(Mixer):
    name = "toy"
    Options = ToyOptions
    uses_rope = False

    def __init__(self, config, layer_idx, attention, first_layer, options):
        super().__init__(config, layer_idx, attention, first_layer, options)
        take_projections(self, attention)
        self.decay = nn.Parameter(torch.empty(self.num_heads))

    @torch.no_grad()
    def reset_new_parameters(self):
        self.decay.fill_(self.options.decay_init)

    def init_state(self, batch_size, device):
        D = self.head_dim
        return {"S": torch.zeros(batch_size, self.num_heads, D, D, device=device)}

    def forward(self, hidden_states, position_embeddings=None, **kwargs):
        x = hidden_states
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        n_rep = H // self.num_kv_heads
        q = self.receptance(x).view(B, T, H, D).float()
        k = repeat_heads(self.key(x).view(B, T, self.num_kv_heads, D), n_rep).float() * D**-0.5
        v = repeat_heads(self.value(x).view(B, T, self.num_kv_heads, D), n_rep).float()
        mask = self.ctx.token_mask
        w = torch.sigmoid(self.decay).view(1, H, 1, 1)
        layer_state = self.ctx.layer_state(self.layer_idx)
        S = x.new_zeros(B, H, D, D, dtype=torch.float32) if layer_state is None else layer_state["S"]
        out = []
        for t in range(T):
            keep = 1.0 if mask is None else mask[:, t].float().view(B, 1, 1, 1)
            S_new = w * S + k[:, t, :, :, None] * v[:, t, :, None, :]
            S = keep * S_new + (1 - keep) * S
            out.append((q[:, t, :, None, :] @ S).squeeze(-2))
        if layer_state is not None:
            layer_state["S"] = S
        y = torch.stack(out, 1).to(x.dtype).reshape(B, T, H * D)
        return self.output(y), None


from .modeling_qwerky import QwerkyForCausalLM  # noqa: E402,F401
'''


@pytest.fixture
def toy_mixer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = tmp_path / "research-mixers"
    folder.mkdir()
    (folder / "mixer_toy.py").write_text(TOY)
    monkeypatch.setattr(modeling_pkg, "__path__", [*modeling_pkg.__path__, str(folder)])
    assert "toy" in mixer_names()  # discovered like any built-in mixer
    yield get_mixer("toy")
    unregister_mixer("toy")
    sys.modules.pop("qwerky.modeling.mixer_toy", None)
    assert "toy" not in MIXERS


def test_throwaway_mixer_through_surgery_training_export_and_serving(toy_mixer, tmp_path: Path) -> None:
    from qwerky.serve.engine import SamplingParams, StudentEngine
    from qwerky.surgery import convert_teacher, save_student
    from qwerky.train.recipe import StageSpec
    from qwerky.train.stages import TeacherTaps, make_loss_fn, trainable_parameters
    from qwerky_testing import build_tokenizer, tiny_teacher

    teacher = tiny_teacher("qwen2")
    student = convert_teacher(teacher, mixer="toy", mixer_options={"decay_init": 0.5})
    assert all(type(m) is toy_mixer for m in student.mixers)
    assert student.config.use_rope is False  # the mixer said it applies no RoPE
    assert torch.allclose(student.mixers[0].decay, torch.full_like(student.mixers[0].decay, 0.5))

    ids = torch.randint(0, 384, (2, 24))
    for stage in (1, 2):  # the stage losses see the new mixer like any other; its parameters get gradients
        spec = StageSpec(loss="align" if stage == 1 else "kl")
        params = trainable_parameters(stage, student, spec)
        taps = TeacherTaps(teacher) if stage == 1 else None
        try:
            loss = make_loss_fn(stage, spec, student, teacher, taps)(ids)
        finally:
            if taps is not None:
                taps.remove()
        assert torch.isfinite(loss) and loss > 0
        grads = torch.autograd.grad(loss, [m.decay for m in student.mixers])
        assert all(g.abs().sum() > 0 for g in grads), f"stage {stage}: no gradient reached the mixer"
        assert {id(m.decay) for m in student.mixers} <= {id(p) for p in params}

    tok = build_tokenizer()
    out = tmp_path / "toy-student"
    save_student(student, tok, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "mixer_toy.QwerkyForCausalLM" and (out / "mixer_toy.py").exists()
    check = textwrap.dedent("""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        assert not any(m.startswith("qwerky") for m in sys.modules), "qwerky must not be imported"
        ids = torch.tensor([[5, 17, 9, 33, 2]])
        out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        print("RESULT " + json.dumps({"cls": type(model.model.layers[0].self_attn).__name__,
                                      "tokens": out[0, 5:].tolist()}))
    """)
    res = subprocess.run([sys.executable, "-c", check, str(out)], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(res.stdout.split("RESULT ", 1)[1].splitlines()[0])
    with torch.no_grad():
        ref = student.generate(torch.tensor([[5, 17, 9, 33, 2]]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert result == {"cls": "ToyMixer", "tokens": ref[0, 5:].tolist()}

    with StudentEngine(student, tok, max_concurrent=2, eos_token_ids=[]) as engine:
        reqs = [engine.submit(p, SamplingParams(max_tokens=6, temperature=0)) for p in ([5, 17, 9, 33, 2], [7] * 11)]
        for r in reqs:
            r.result(timeout=120)
        outputs = [r.output_ids for r in reqs]
    assert outputs[0] == ref[0, 5:11].tolist()
    assert len(outputs[1]) == 6


def test_registry_rejects_incomplete_mixers() -> None:
    from qwerky.modeling.mixer_base import Mixer, register_mixer

    class Nameless(Mixer):
        pass

    with pytest.raises(ValueError, match="needs a `name`"):
        register_mixer(Nameless)

    class BadOptions(Mixer):
        name = "bad"
        Options = dict  # type: ignore[assignment]

    with pytest.raises(TypeError, match="MixerOptions dataclass"):
        register_mixer(BadOptions)
