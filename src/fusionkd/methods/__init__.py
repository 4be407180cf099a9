"""Distillation methods. Every module in this folder is imported, so a method registers itself by
being a file here that uses ``@register_method``.

The installed ``fusionkd.methods`` entry points are loaded by :data:`METHODS` itself, on its first lookup
(see :mod:`fusionkd.registry`), after the built-in methods below registered, so they keep their names."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

from ..errors import PluginError
from .base import (
    METHODS,
    EnsembleTeacher,
    Method,
    MethodContext,
    NoOptions,
    Teacher,
    count_parameters,
    register_method,
)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in {"base", "losses"} and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")


def adopt_method(name: str, obj: Any, doc: str) -> None:
    """An entry point of ``fusionkd.methods`` that names a :class:`Method` subclass: registered under ``name``
    (unless the class registered itself with ``@register_method`` when its module was imported)."""
    if not (inspect.isclass(obj) and issubclass(obj, Method)):
        raise PluginError(f"entry point {name!r} of fusionkd.methods must name a module or a Method subclass, "
                          f"got {obj!r}")
    if getattr(obj, "name", None) and obj.name in METHODS:
        return
    register_method(name, doc)(obj)


METHODS.adopt_with(adopt_method)

__all__ = ["METHODS", "EnsembleTeacher", "Method", "MethodContext", "NoOptions", "Teacher", "count_parameters",
           "register_method"]
