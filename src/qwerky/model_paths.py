"""Is this path a model qwerky can read? A Hugging Face folder with a readable config.json, or a GGUF file.

Checked before any weights are read so that a wrong path fails in one line. It sits low in the package (it needs
only the error base and, for a .gguf file, teacher_gguf's header check) so that every layer, surgery included,
can check a path without importing the teacher loader above it.
"""

from __future__ import annotations

import json
from pathlib import Path

from qwerky.errors import QwerkyError


def is_gguf(path: str | Path) -> bool:
    """A teacher given as one GGUF file rather than a folder (teacher_gguf loads it)."""
    from qwerky.teacher_gguf import looks_like_gguf

    return looks_like_gguf(path)


def check_model_dir(path: str | Path, what: str = "teacher") -> Path:
    """A HF model folder with a readable config.json; for a teacher or model, a loadable GGUF file also passes."""
    p = Path(path)
    if what != "student" and is_gguf(p):
        from qwerky.teacher_gguf import check_gguf_file

        return check_gguf_file(p, what)
    if p.is_file() and what != "student":
        raise QwerkyError(f"{what} {p} is a file, not a model folder (pass a Hugging Face model folder containing "
                          "config.json, or a .gguf file)")
    if not p.exists():
        raise QwerkyError(f"{what} folder not found: {p} (pass a Hugging Face model folder containing config.json)")
    if not (p / "config.json").is_file():
        raise QwerkyError(f"{what} folder {p} has no config.json (pass a Hugging Face model folder, e.g. one written "
                          "by save_pretrained)")
    try:
        json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise QwerkyError(f"{what} config {p / 'config.json'} is not valid JSON: {err.msg} "
                          f"at line {err.lineno}") from None
    return p
