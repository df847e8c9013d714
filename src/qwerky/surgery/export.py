"""The converted-model folder: a standard HF folder that loads with plain transformers.

Layout: config.json (model_type "qwerky", with auto_map), the modeling/configuration code copied from
`qwerky/modeling/`, model.safetensors, generation_config.json and the teacher's tokenizer files.
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads it without qwerky installed.
The folder is written to a temporary sibling and moved into place, so a crash never leaves half a model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

import qwerky.modeling as modeling_pkg

AUTO_MAP = {
    "AutoConfig": "configuration_qwerky.QwerkyConfig",
    "AutoModelForCausalLM": "modeling_qwerky.QwerkyForCausalLM",
    "AutoModel": "modeling_qwerky.QwerkyForCausalLM",
}


def modeling_files() -> list[Path]:
    """The self-contained model code that travels with every exported folder."""
    root = Path(modeling_pkg.__file__).parent
    return sorted(p for p in root.glob("*.py") if p.name != "__init__.py")


def atomic_replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished folder into place; an existing folder is swapped out, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_student(student: Any, tokenizer: Any, out_dir: str | Path, extra_files: dict[str, Any] | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Write the student (and tokenizer) as a trust_remote_code HF folder, atomically."""
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        student.config.auto_map = dict(AUTO_MAP)
        state = {k: v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()
                 for k, v in student.state_dict().items()}
        student.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        for f in modeling_files():
            shutil.copy2(f, tmp / f.name)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["auto_map"] = dict(AUTO_MAP)
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
