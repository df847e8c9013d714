"""The mixer protocol and registry: what replaces one attention block, and how a name finds its class.

A student mixer is one file `mixer_<name>.py` beside this one (plus, usually, its `ops_<name>.py`):

    @register_mixer
    class MyMixer(Mixer):
        name = "my"                      # the name users pass (--mixer my, student.mixer: my)
        Options = MyOptions              # a MixerOptions dataclass: typed fields, one doc per field
        uses_rope = True                 # apply the teacher's RoPE (sets config.use_rope at conversion)

        def __init__(self, config, layer_idx, attention, first_layer, options): ...  # declare, don't fill
        def reset_new_parameters(self): ...   # the one place new parameters get their starting values
        def init_state(self, batch_size, device): ...  # fixed-size per-sequence state: {name: [B, ...]}
        def forward(self, hidden_states, position_embeddings=None, **kwargs): ...  # -> (output, None)

    from .modeling_qwerky import QwerkyForCausalLM  # noqa: E402,F401  (see below)

The last line is why an exported folder works: its `auto_map` points at the mixer's own module, so
transformers' trust_remote_code copies exactly the files that mixer imports (it follows only static
relative imports), and importing the module registers the mixer before the model is built. Inside the
qwerky package `mixer_names()` / `get_mixer()` discover every `mixer_*.py` of the package (this folder,
plus any folder in the QWERKY_MIXER_PATH environment variable), so nothing else
lists the mixers: the CLI, recipes, surgery, tests and benchmarks all read this registry.

Copied into every exported model folder: imports nothing from qwerky.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .options import describe_options, option, parse_options

__all__ = ["MIXERS", "ForwardContext", "Mixer", "MixerOptions", "discover_mixers", "get_mixer", "mixer_names", "option",
           "register_mixer", "unregister_mixer"]


class ForwardContext:
    """What one forward pass shares across layers (set by QwerkyForCausalLM; empty for standalone use)."""

    def __init__(self) -> None:
        self.state: Any = None  # QwerkyState or None (parallel form from an empty state)
        self.token_mask: torch.Tensor | None = None  # [B, T] bool, False = padding
        self.positions: torch.Tensor | None = None  # [B, T] absolute positions, -1 = padding
        self.v_first: torch.Tensor | None = None  # first recurrent layer's values (RWKV-7 value residual)
        self.backend: str = "auto"  # kernel choice: auto | fla | torch | naive

    def layer_state(self, layer_idx: int) -> dict[str, torch.Tensor] | None:
        return None if self.state is None else self.state.layers[layer_idx]

    def positions_for(self, B: int, T: int, device: torch.device) -> torch.Tensor:
        """Absolute positions [B, T] of this pass (0..T-1 when the model did not set them)."""
        if self.positions is not None:
            return self.positions
        return torch.arange(T, device=device).expand(B, T)


@dataclasses.dataclass
class MixerOptions:
    """Per-mixer options (config.mixer_options). Subclass with `option(...)` fields; add checks in `check`."""

    def check(self) -> None:
        """Raise ValueError for values that type checks cannot catch (ranges, orderings)."""

    @classmethod
    def parse(cls, values: Mapping[str, Any] | None, where: str = "mixer_options") -> MixerOptions:
        """Build from a mapping (config, recipe or CLI), rejecting unknown keys and mistyped values."""
        opts = parse_options(cls, values, where)
        opts.check()
        return opts

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def describe(cls) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, doc) of every option."""
        return describe_options(cls)


class Mixer(nn.Module):
    """One replaced attention block. Subclasses declare their new parameters in `__init__` (values are
    set only by `reset_new_parameters`), their per-sequence state in `init_state`, and return
    `(output [B, T, C], None)` from `forward`, like an HF attention module returns (output, weights).

    A student mixer's constructor takes over the teacher attention's projections with `take_projections`
    (q->receptance, k->key, v->value, o->output, q/k norms -> r/k norms); GQA key/value keep their head
    count (`repeat_heads` at run time).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[MixerOptions]] = MixerOptions
    uses_rope: ClassVar[bool] = True  # whether the mixer applies the teacher's RoPE to r/k
    state_pad_values: ClassVar[dict[str, int]] = {}  # fill of growing state tensors when rows are stacked
    description: ClassVar[str] = ""  # one line for `qwerky mixers`
    fits_output_scale: ClassVar[bool] = True  # stage 0 may scale o_proj per head to the teacher's output size

    def __init__(self, config: Any, layer_idx: int, attention: nn.Module, first_layer: bool,
                 options: MixerOptions) -> None:
        super().__init__()
        self.layer_idx, self.first_layer, self.options = layer_idx, first_layer, options
        self.hidden_size = config.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.use_rope = config.use_rope
        self.ctx = ForwardContext()  # replaced by the model's shared context

    @torch.no_grad()
    def reset_new_parameters(self) -> None:
        """Give the parameters the teacher did not have their starting values (the only place they are set:
        the model calls it after building, surgery again after filling them on the real device)."""

    def init_state(self, batch_size: int, device: torch.device | str | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def calibrate(self, hidden_states: torch.Tensor) -> bool:
        """Optional data-dependent initialisation from the teacher's input to this layer on real text,
        run once before training; returns whether it did anything."""
        return False


MIXERS: dict[str, type[Mixer]] = {}


def register_mixer(cls: type[Mixer]) -> type[Mixer]:
    """Class decorator: make a mixer available by `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name` to be registered")
    if not (dataclasses.is_dataclass(cls.Options) and issubclass(cls.Options, MixerOptions)):
        raise TypeError(f"{cls.__name__}.Options must be a MixerOptions dataclass")
    MIXERS[cls.name] = cls
    return cls


def unregister_mixer(name: str) -> None:
    """Remove a mixer (for tests that register throw-away ones)."""
    MIXERS.pop(name, None)


def discover_mixers() -> None:
    """Import every `mixer_*.py` of this package (each registers itself); the package's path is this
    folder, plus in qwerky the folders named by QWERKY_MIXER_PATH."""
    package = sys.modules.get(__package__ or "")
    folders = list(getattr(package, "__path__", None) or [Path(__file__).parent])
    for folder in folders:
        for path in sorted(Path(folder).glob("mixer_*.py")):
            name = f"{__package__}.{path.stem}"
            if path.stem != "mixer_base" and name not in sys.modules:
                importlib.import_module(name)


def mixer_names() -> list[str]:
    """Every registered student mixer, sorted."""
    discover_mixers()
    return sorted(MIXERS)


def get_mixer(name: str) -> type[Mixer]:
    """The mixer class registered as `name`, with an error that lists the choices."""
    if name not in MIXERS:
        discover_mixers()
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; choose one of {', '.join(sorted(MIXERS)) or 'none'}")
    return MIXERS[name]
