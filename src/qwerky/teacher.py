"""Loading a teacher folder (or GGUF file, see teacher_gguf): fail fast, with one clear line, before any weights
are read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qwerky.errors import QwerkyError  # also importable from here, as before
from qwerky.model_paths import check_model_dir, is_gguf  # noqa: F401 (importable from here too)


def teacher_skeleton(config: Any) -> torch.nn.Module:
    """The teacher's module tree on the meta device: lets surgery and planning inspect it for free."""
    from transformers import AutoModelForCausalLM

    from qwerky.surgery.families import FAMILY_HINT, UnsupportedArchitectureError

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError as err:
            first = str(err).strip().splitlines()[0]
            raise UnsupportedArchitectureError(
                f"unsupported architecture '{config.model_type}': transformers has no causal LM for it ({first}); "
                f"{FAMILY_HINT}") from None


def load_config(path: str | Path) -> Any:
    """A teacher's HF config from its folder, its config.json or a GGUF file's metadata (no weights read)."""
    from transformers import AutoConfig

    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        data = json.loads(p.read_text())
        _not_a_student(data, p)
        return AutoConfig.for_model(**data)
    if is_gguf(p):
        from qwerky.teacher_gguf import gguf_config

        return gguf_config(p)  # metadata only: no weight is dequantised
    folder = check_model_dir(p)
    _not_a_student(json.loads((folder / "config.json").read_text()), folder)
    return AutoConfig.from_pretrained(str(folder))


def _not_a_student(config: dict[str, Any], where: Path) -> None:
    if config.get("model_type") == "qwerky":
        raise QwerkyError(f"{where} is already a converted qwerky model; pass the original transformer as --teacher")


def load_teacher(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Any:
    """Validate the folder (or GGUF file) and the architecture (on meta, no weights read), then load the teacher,
    frozen. A GGUF teacher is dequantised into a plain dense model of `dtype`."""
    from transformers import AutoModelForCausalLM

    from qwerky.surgery.families import inspect_teacher

    p = check_model_dir(path)
    config = load_config(p)  # a converted student is refused here, before transformers asks for remote code
    inspect_teacher(teacher_skeleton(config))
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if is_gguf(p):
        from qwerky.teacher_gguf import load_gguf_model

        model = load_gguf_model(p, dtype=dtype, config=config)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
    model.to(device).eval().requires_grad_(False)
    return model


def load_tokenizer(path: str | Path) -> Any:
    """The folder's tokenizer files, or the tokenizer and chat template stored in a GGUF file."""
    from transformers import AutoTokenizer

    if is_gguf(path):
        from qwerky.teacher_gguf import gguf_tokenizer

        return gguf_tokenizer(path)
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - any tokenizer failure is reported the same way
        raise QwerkyError(f"cannot load a tokenizer from {path}: {str(err).splitlines()[0]} (the teacher folder must "
                          "include its tokenizer files)") from None


def load_any_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Any:
    """A qwerky folder with qwerky's own classes, any other HF causal LM with transformers."""
    p = check_model_dir(path, "model")
    if is_gguf(p):
        return load_teacher(p, device=device, dtype=dtype)
    cfg = json.loads((p / "config.json").read_text())
    if cfg.get("model_type") == "qwerky":
        from qwerky.surgery.export import load_student

        return load_student(p, device=device, dtype=dtype)
    return load_teacher(p, device=device, dtype=dtype)
