"""The converted-model folder: a standard HF folder that loads with plain transformers.

Layout: config.json (model_type "qwerky", with auto_map), the modeling/configuration code copied from
`qwerky/modeling/` (with the student's mixer file wherever it lives), model.safetensors,
generation_config.json and the teacher's tokenizer files. `auto_map` points the model class at the
mixer's own module, which re-exports QwerkyForCausalLM: transformers copies the files a module imports,
so the folder's code is complete whichever mixer it uses (see mixer_base).
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads it without qwerky installed.
The folder is written to a temporary sibling and moved into place, so a crash never leaves half a model.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import qwerky.modeling as modeling_pkg
from qwerky.errors import QwerkyError
from qwerky.modeling.mixer_base import get_mixer


def auto_map(mixer: str) -> dict[str, str]:
    """The config's auto_map: the model class is reached through the mixer's module (see the docstring)."""
    module = _mixer_module(mixer).__name__.rpartition(".")[2]
    return {"AutoConfig": "configuration_qwerky.QwerkyConfig",
            "AutoModelForCausalLM": f"{module}.QwerkyForCausalLM",
            "AutoModel": f"{module}.QwerkyForCausalLM"}


def _mixer_module(mixer: str) -> Any:
    cls = get_mixer(mixer)
    module = sys.modules[cls.__module__]
    if not cls.__module__.startswith(modeling_pkg.__name__ + "."):
        raise ValueError(f"mixer {mixer!r} is defined in {cls.__module__}; an exported folder can only carry a mixer "
                         "that is a module of qwerky.modeling (a mixer_*.py file beside mixer_base.py or in a "
                         "folder named by QWERKY_MIXER_PATH)")
    if getattr(module, "QwerkyForCausalLM", None) is None:
        raise ValueError(f"{cls.__module__} must end with `from .modeling_qwerky import QwerkyForCausalLM` "
                         "(exported folders load the model through the mixer's module; see mixer_base)")
    return module


def modeling_files(mixer: str = "rwkv7") -> list[Path]:
    """The self-contained model code that travels with every exported folder, the mixer's file included."""
    root = Path(modeling_pkg.__file__).parent
    files = {p.name: p for p in root.glob("*.py") if p.name != "__init__.py"}
    own = Path(inspect.getfile(_mixer_module(mixer)))
    files.setdefault(own.name, own)
    return sorted(files.values())


def atomic_replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished folder into place; an existing folder is swapped out, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class NonFiniteWeights(QwerkyError):
    """A student whose weights hold NaN or inf: refused at export."""


def save_student(student: Any, tokenizer: Any, out_dir: str | Path, extra_files: dict[str, Any] | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Write the student (and tokenizer) as a trust_remote_code HF folder, atomically."""
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        student.config.auto_map = auto_map(student.config.mixer)
        state = {k: v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()
                 for k, v in student.state_dict().items()}
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:  # whatever the run's flags said (--no-eval, keep=last): a NaN/inf model is never written
            raise NonFiniteWeights(f"not exporting {out}: {len(bad)} of {len(state)} tensors hold NaN/inf "
                                   f"(first: {', '.join(bad[:3])}); training diverged: lower the learning rate")
        student.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        for f in modeling_files(student.config.mixer):
            shutil.copy2(f, tmp / f.name)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["auto_map"] = auto_map(student.config.mixer)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():
            text = content if isinstance(content, str) else json.dumps(content, indent=2)
            (tmp / name).write_text(text)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; the model folder should be like any other
        atomic_replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_student(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Any:
    """Load an exported folder with qwerky's own classes (no remote-code copy needed)."""
    from qwerky.modeling.modeling_qwerky import QwerkyForCausalLM

    model = QwerkyForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    return model.to(device).eval()
