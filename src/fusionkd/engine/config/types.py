"""Type checking of configuration values: :func:`build_dataclass` builds a dataclass from a mapping, checking
every field against its annotation (an int is accepted for a float; nothing else is converted) and refusing
unknown keys with the close matches; :func:`build_options` does it for a method's ``Options``."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any

from ...errors import ConfigError


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _check(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to ``tp`` (int -> float only) or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {_type_name(args[0])}, got {value!r}")
        return [_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build_dataclass(tp, value, where)
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def build_dataclass(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, type-checking every field and rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=2)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"unknown option {path!r}.{hint} Accepted: {', '.join(names) or '(none)'}")
        kwargs[key] = _check(value, hints[key], path)
    return cls(**kwargs)


def build_options(method_cls: type, options: dict[str, Any], method_name: str) -> Any:
    """The method's typed ``Options`` dataclass from the ``options:`` mapping."""
    try:
        opts = build_dataclass(method_cls.Options, options or {}, "options")
    except ConfigError as e:
        raise ConfigError(f"method {method_name!r}: {e}") from None
    check = getattr(opts, "validate", None)
    if callable(check):
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"method {method_name!r}: {e}") from None
    return opts
