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
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn


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


def option(default: Any, doc: str) -> Any:
    """A MixerOptions field with its documentation (shown by `qwerky mixers` and in errors)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass
class MixerOptions:
    """Per-mixer options (config.mixer_options). Subclass with `option(...)` fields; add checks in `check`."""

    def check(self) -> None:
        """Raise ValueError for values that type checks cannot catch (ranges, orderings)."""

    @classmethod
    def parse(cls, values: Mapping[str, Any] | None, where: str = "mixer_options") -> MixerOptions:
        """Build from a mapping (config, recipe or CLI), rejecting unknown keys and mistyped values."""
        values = dict(values or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            valid = ", ".join(fields) or "none"
            raise ValueError(f"{where}: unknown option(s) {', '.join(unknown)} (valid: {valid})")
        hints = typing.get_type_hints(cls)
        parsed = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in values.items()}
        opts = cls(**parsed)
        opts.check()
        return opts

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def describe(cls) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, doc) of every option."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("doc", "")))
        return out


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and losslessly convert) one option value against its annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            raise ValueError(f"{where} must have {len(args)} entries, got {list(value)!r}")
        item = args[0] if args else Any
        items = [v if item is Any else _coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is str and not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {value!r}")
    return value


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
