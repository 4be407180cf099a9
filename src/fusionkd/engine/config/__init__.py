"""The run configuration: one typed schema shared by the CLI, the YAML files and the Python API.

Resolution order (later wins): the defaults below < the method's published recipe
(``Method.recipe``) < a YAML file (``--config``) < ``key=value`` overrides / API keyword arguments.
Everything is validated before any work starts: unknown keys, unknown names, wrong types and
incompatible combinations raise :class:`ConfigError` with what was wrong and what is accepted.

The package by job: :mod:`.schema` (the dataclasses, :data:`CHOICES`, :data:`RANGES`), :mod:`.types` (type
checks, :func:`build_dataclass`), :mod:`.resolve` (layers, overrides, files and presets) and :mod:`.validate`;
every name is importable from here.
"""

from __future__ import annotations

from ...errors import ConfigError
from .resolve import deep_merge, load_yaml, nest, parse_override, read_value, resolve_config
from .schema import CHOICES, RANGES, AugmentConfig, Config, Range, numeric_fields
from .types import build_dataclass, build_options
from .validate import (
    check_files,
    check_run_name,
    check_teacher_keys,
    native_image_size,
    resolve_device,
    validate,
)

__all__ = [
    "CHOICES",
    "RANGES",
    "AugmentConfig",
    "Config",
    "ConfigError",
    "Range",
    "build_dataclass",
    "build_options",
    "check_files",
    "check_run_name",
    "check_teacher_keys",
    "deep_merge",
    "load_yaml",
    "native_image_size",
    "nest",
    "numeric_fields",
    "parse_override",
    "read_value",
    "resolve_config",
    "resolve_device",
    "validate",
]
