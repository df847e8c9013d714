"""A GGUF file as a teacher: `--teacher model.Q4_1.gguf` wherever a teacher folder is accepted.

Many small and instruction-tuned models are published (or only kept) as one llama.cpp GGUF file. Transformers
reads its config, tokenizer and chat template from the metadata and dequantises its weights; this module
turns that into what the rest of qwerky expects of a teacher: a *plain* dense HF causal LM (fp32, or the
dtype asked for), not marked quantised (so it can be saved, converted and trained against), frozen.

What transformers cannot load from GGUF is refused before any weight is read, with one line naming what
it can. The architecture is read from the first metadata keys (no full parse: a 49k-token vocabulary in
the metadata takes seconds to parse with gguf-py), so the check is instant.
"""

from __future__ import annotations

import contextlib
import functools
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from qwerky.errors import QwerkyError

GGUF_MAGIC = b"GGUF"
# GGUF architecture names transformers spells differently in its table (see load_gguf_checkpoint)
_ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2",
                 "t5encoder": "t5"}
# gguf value types -> struct format of a scalar (8: string, 9: array are read separately)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def looks_like_gguf(path: str | Path) -> bool:
    """A path meant as a GGUF file: named *.gguf, or any file that starts with the GGUF magic."""
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        return True
    if not p.is_file():
        return False
    with p.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def supported_architectures() -> list[str]:
    """GGUF architectures the installed transformers can load (its legacy table plus its native loader's)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}  # metadata sections, not models
    with contextlib.suppress(ImportError):
        from transformers.integrations.gguf import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    return sorted(names)


def _read_string(f: BinaryIO, order: str) -> str:
    (n,) = struct.unpack(order + "Q", f.read(8))
    return f.read(n).decode("utf-8", errors="replace")


def _skip_value(f: BinaryIO, order: str, vtype: int) -> None:
    if vtype == 8:
        _read_string(f, order)
    elif vtype == 9:
        etype, count = struct.unpack(order + "IQ", f.read(12))
        if etype in _SCALARS:
            f.seek(struct.calcsize(_SCALARS[etype]) * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, order, etype)
    elif vtype in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[vtype]), 1)
    else:
        raise ValueError(f"unknown metadata value type {vtype}")


def gguf_architecture(path: str | Path, what: str = "teacher") -> str:
    """`general.architecture` from the header, reading only up to that key."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ValueError("no GGUF magic")
            version_le = struct.unpack("<I", f.read(4))[0]
            order = ">" if (version_le & 0xFFFF) == 0 else "<"  # big-endian files exist (s390x)
            version = struct.unpack(order + "I", struct.pack("<I", version_le))[0]
            if version < 2:
                raise ValueError(f"GGUF version {version} is too old (transformers reads 2 and 3)")
            _, n_kv = struct.unpack(order + "QQ", f.read(16))
            for _ in range(n_kv):
                key = _read_string(f, order)
                (vtype,) = struct.unpack(order + "I", f.read(4))
                if key == "general.architecture" and vtype == 8:
                    return _read_string(f, order)
                _skip_value(f, order, vtype)
    except (OSError, ValueError, struct.error, MemoryError) as err:
        raise QwerkyError(f"{what} {p} is not a valid GGUF file ({err or type(err).__name__}); pass a GGUF model "
                          "file or a Hugging Face model folder") from None
    raise QwerkyError(f"{what} {p} is a GGUF file without general.architecture; it is not a model file")


def check_gguf_file(path: str | Path, what: str = "teacher") -> Path:
    """The file exists, is a GGUF model, and transformers can load its architecture; else one clear line."""
    p = Path(path)
    if not p.exists():
        raise QwerkyError(f"{what} GGUF file not found: {p} (pass a .gguf model file or a Hugging Face model folder)")
    if not p.is_file():
        raise QwerkyError(f"{what} {p} is not a file (a GGUF teacher is one .gguf file)")
    with p.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise QwerkyError(f"{what} {p} is not a GGUF file (it does not start with the GGUF magic); pass a GGUF "
                              "model file or a Hugging Face model folder")
    try:
        import gguf  # noqa: F401 - transformers reads GGUF files with it
    except ImportError:
        raise QwerkyError("a GGUF teacher needs the Python package 'gguf': pip install gguf==0.19.0") from None
    arch = gguf_architecture(p, what)
    known = supported_architectures()
    if arch not in known and _ARCH_ALIASES.get(arch) not in known:
        import transformers

        raise QwerkyError(f"{what} {p} has GGUF architecture '{arch}', which transformers {transformers.__version__} "
                          f"cannot load from GGUF; it can: {', '.join(known)} (or pass the original Hugging Face model "
                          "folder)")
    return p


def _gguf_kwargs(p: Path) -> dict[str, Any]:
    return {"pretrained_model_name_or_path": str(p.parent), "gguf_file": p.name}


def _one_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def gguf_config(path: str | Path) -> Any:
    """The HF config rebuilt from the metadata; no tensor is read (what `qwerky plan` needs)."""
    from transformers import AutoConfig

    p = check_gguf_file(path)
    try:
        return AutoConfig.from_pretrained(**_gguf_kwargs(p))
    except (ValueError, KeyError, OSError) as err:
        raise QwerkyError(f"cannot read a model config from {p}: {_one_line(err)}") from None


def gguf_tokenizer(path: str | Path) -> Any:
    """The tokenizer and chat template stored in the GGUF metadata, as a HF fast tokenizer."""
    from transformers import AutoTokenizer

    p = check_gguf_file(path)
    try:
        return AutoTokenizer.from_pretrained(**_gguf_kwargs(p))
    except Exception as err:  # noqa: BLE001 - any converter failure is reported the same way
        raise QwerkyError(f"cannot load a tokenizer from the GGUF file {p}: {_one_line(err)}") from None


@contextlib.contextmanager
def _cached_tensor_name_maps() -> Iterator[None]:
    """Build gguf-py's tensor-name map once per (arch, layers) while loading.

    transformers' legacy GGUF loader rebuilds it for every submodule (397 times for SmolLM2-135M: 5.2 s of a
    ~20 s load on a 2-core CPU, 0.01 s cached). The map is a pure function of its arguments.
    """
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.cache(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _plain(model: Any, dtype: torch.dtype) -> Any:
    """The same weights in a model transformers does not consider quantised (it refuses to save those).

    transformers 5.23 with GgufConfig(dequantize=True) already returns one; without it (older versions) the
    dequantised model stays marked, and is rebuilt from its config (a second copy while it runs).
    """
    if not getattr(model, "is_quantized", False):
        return model
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict())
    return plain


def load_gguf_model(path: str | Path, dtype: torch.dtype | None = None, config: Any = None) -> Any:
    """Dequantise every weight into a plain dense HF causal LM (fp32 unless `dtype`), in eval mode."""
    from transformers import AutoModelForCausalLM

    p = check_gguf_file(path)
    dtype = dtype or torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype, "config": config if config is not None else gguf_config(p)}
    try:
        from transformers import GgufConfig  # transformers >= 5.23: else weights may stay in packed blocks

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    try:
        with _cached_tensor_name_maps():
            model = AutoModelForCausalLM.from_pretrained(**_gguf_kwargs(p), **kwargs)
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as err:
        raise QwerkyError(f"cannot load the weights of {p}: {_one_line(err)}") from None
    return _plain(model, dtype).eval()
