"""Typed, documented option dataclasses: the one coercer behind mixer options and recipe sections.

Why one: a value reaches qwerky from YAML, from `--set KEY=VALUE`, from a saved config.json or from Python, and
the same field must accept the same spellings and fail with the same words wherever it is written. A field is
declared with `option(default, doc)` and a type hint (`int`, `float`, `bool`, `str`, `Literal[...]`, `list[...]`,
`tuple[...]`, `dict[...]`, or a nested options dataclass); `parse_options` builds the dataclass from a mapping,
rejecting unknown keys, and `describe_options` lists (name, type, default, doc) for `--help` texts.

Copied into every exported model folder (mixer_base imports it): imports nothing from qwerky.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def option(default: Any, doc: str) -> Any:
    """A dataclass field with its documentation (shown by `qwerky mixers`, `--help-recipe` and in errors).
    A dataclass default is a nested section; lists and dicts get a fresh copy per instance."""
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": doc})
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def field_hints(cls: type) -> dict[str, Any]:
    """The resolved type hints of an options dataclass (its module's names resolve string annotations)."""
    return typing.get_type_hints(cls)


def parse_options(cls: type, values: Mapping[str, Any] | None, where: str,
                  unknown: Callable[[str, list[str]], str] | None = None) -> Any:
    """`cls(**values)` with every value coerced to its field's type; unknown keys raise ValueError (a typo must
    not silently fall back to a default). `unknown(path, valid)` may word that error (e.g. for moved fields)."""
    values = dict(values or {})
    fields = [f.name for f in dataclasses.fields(cls)]
    hints = field_hints(cls)
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ValueError(unknown(path, fields) if unknown else
                             f"{where}: unknown option(s) {key} (valid: {', '.join(fields) or 'none'})")
        kwargs[key] = coerce(value, hints[key], path, unknown)
    return cls(**kwargs)


def coerce(value: Any, tp: Any, where: str, unknown: Callable[[str, list[str]], str] | None = None) -> Any:
    """Check (and losslessly convert) one value against its annotation; ValueError names `where` and the type."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} is a section: give a mapping of its fields, got {value!r}")
        return parse_options(tp, value, where, unknown)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return _literal(value, typing.get_args(tp), where)
    if origin in (tuple, list):
        return _sequence(value, origin, typing.get_args(tp), where)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    scalar = _SCALARS.get(tp)
    return value if scalar is None else scalar(value, where)


def _literal(value: Any, choices: tuple[Any, ...], where: str) -> Any:
    if isinstance(value, bool) and ("on" in choices or "off" in choices):
        value = "on" if value else "off"  # YAML 1.1 reads a bare on/off/yes/no as a boolean
    if value not in choices:
        raise ValueError(f"{where} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _sequence(value: Any, origin: type, args: tuple[Any, ...], where: str) -> list[Any] | tuple[Any, ...]:
    if isinstance(value, str):  # `--set student.attention_layers=1,3`
        value = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):  # `--set student.attention_layers=3`
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where} must be a list, got {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
        raise ValueError(f"{where} must have {len(args)} entries, got {list(value)!r}")
    item = args[0] if args else Any
    items = [v if item is Any else coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {value!r}")
    return value


def _int(value: Any, where: str) -> int:
    number = None if isinstance(value, bool) else _number(value)
    if number is None or not float(number).is_integer():
        raise ValueError(f"{where} must be an integer, got {value!r}")
    return int(number)


def _float(value: Any, where: str) -> float:
    number = None if isinstance(value, bool) else _number(value)
    if number is None:
        raise ValueError(f"{where} must be a number, got {value!r}")
    return float(number)


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {value!r}")
    return value


_SCALARS: dict[Any, Callable[[Any, str], Any]] = {bool: _bool, int: _int, float: _float, str: _str}


def _number(value: Any) -> float | int | None:
    """An int or float, or a string that reads as one (`--set stage2.tokens=1e6`: YAML leaves `1e6` a string)."""
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def describe_options(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted name, type, default, doc) of every field; nested sections are flattened under their name."""
    hints = field_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(default):
            out += describe_options(type(default), prefix=f"{name}.")
            continue
        out.append((name, type_name(hints[f.name]), default, f.metadata.get("doc", "")))
    return out


def type_name(tp: Any) -> str:
    """A short, readable type: `int`, `'cosine' | 'constant'`, `list[int]`."""
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))
