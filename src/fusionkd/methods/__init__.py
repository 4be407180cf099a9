"""Distillation methods. Every module in this folder is imported, so a method registers itself by
being a file here that uses ``@register_method``."""

from __future__ import annotations

import importlib
import pkgutil

from .base import METHODS, Method, MethodContext, NoOptions, Teacher, count_parameters, register_method

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in {"base", "losses"} and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

from ..plugins import load_entry_points  # noqa: E402 - after the built-in methods, so they keep their names

load_entry_points()

__all__ = ["METHODS", "Method", "MethodContext", "NoOptions", "Teacher", "count_parameters", "register_method"]
