"""vLLM plugin: `vllm serve ./student` and `LLM("./student")` for folders exported by `qwerky convert`.

vLLM finds `register` through the `vllm.general_plugins` entry point (pyproject.toml) and calls it in
every process it starts. It registers the architecture name that exported folders carry
(`QwerkyForCausalLM`) with vLLM's ModelRegistry, lazily (by "module:Class" string), and the config class
for model_type "qwerky", so no `--trust-remote-code` is needed. Nothing here imports vLLM at import time:
`import qwerky.vllm` works without it (the main package never imports this module).

Which student mixers vLLM can run is `SUPPORTED_MIXERS`: every registered mixer with a module of its name here
(the others fail at load with a clear error).
Design and limits: docs/vllm.md.
"""

from __future__ import annotations

ARCHITECTURES = {"QwerkyForCausalLM": "qwerky.vllm.model:QwerkyForCausalLM",
                 # hybrids (attention layers kept); config.json still says QwerkyForCausalLM: the config class
                 # (qwerky.vllm.config) routes them here
                 "QwerkyHybridForCausalLM": "qwerky.vllm.model:QwerkyHybridForCausalLM"}


def supported_mixers() -> dict[str, str]:
    """mixer name (config.mixer) -> "module:attribute" of its vLLM layer: every registered student mixer that has
    a module of its own name in this package (`qwerky/vllm/<mixer>.py`, whose `LAYER` is the layer class). Derived,
    not listed: a new mixer's vLLM layer is its module, nothing else."""
    from pathlib import Path

    from qwerky.modeling.mixer_base import mixer_names

    here = Path(__file__).parent
    return {m: f"qwerky.vllm.{m}:LAYER" for m in mixer_names() if (here / f"{m}.py").is_file()}


def __getattr__(name: str) -> object:  # SUPPORTED_MIXERS reads the registry when asked, not at import
    if name == "SUPPORTED_MIXERS":
        return supported_mixers()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# what reads or writes the state runs in these custom ops (qwerky.vllm.layer): graph split points for
# vLLM's compiler (like its own linear-attention ops), so the per-request Python in them is never captured
CUSTOM_OPS = ("vllm::qwerky_state_update", "vllm::qwerky_token_shift")


def register() -> None:
    """Entry point of the `vllm.general_plugins` group; safe to call more than once."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch, path in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, path)
    register_config()
    _register_splitting_ops()
    _register_config_hook()


def register_config() -> None:
    """Make model_type "qwerky" resolve to qwerky's config class (vLLM's registry and transformers')."""
    from transformers import AutoConfig

    from qwerky.vllm.config import VllmQwerkyConfig

    try:
        from vllm.transformers_utils.config import _CONFIG_REGISTRY

        _CONFIG_REGISTRY["qwerky"] = VllmQwerkyConfig
    except ImportError:  # pragma: no cover - layout of another vLLM version
        pass
    AutoConfig.register("qwerky", VllmQwerkyConfig, exist_ok=True)


def _register_splitting_ops() -> None:
    try:
        from vllm.config.compilation import CompilationConfig
    except ImportError:  # pragma: no cover
        return
    ops = getattr(CompilationConfig, "_attention_ops", None)
    if isinstance(ops, list):
        for op in CUSTOM_OPS:
            if op not in ops:
                ops.append(op)


def _register_config_hook() -> None:
    """vLLM's per-architecture config hooks for state models (mamba block size, cache mode) and hybrids."""
    try:
        from vllm.model_executor.models.config import (
            MODELS_CONFIG_MAP,
            HybridAttentionMambaModelConfig,
            MambaModelConfig,
        )
    except ImportError:  # pragma: no cover
        return
    MODELS_CONFIG_MAP.setdefault("QwerkyForCausalLM", MambaModelConfig)
    MODELS_CONFIG_MAP.setdefault("QwerkyHybridForCausalLM", HybridAttentionMambaModelConfig)


def mixer_layer(name: str) -> type:
    """The vLLM layer class of a student mixer, or a ValueError naming the supported ones."""
    import importlib

    supported = supported_mixers()
    if name not in supported:
        raise ValueError(f"qwerky's vLLM plugin does not implement the {name!r} mixer yet (supported: "
                         f"{', '.join(supported)}); serve this student with `qwerky serve`")
    module, _, cls = supported[name].partition(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["ARCHITECTURES", "SUPPORTED_MIXERS", "mixer_layer", "register", "register_config", "supported_mixers"]
