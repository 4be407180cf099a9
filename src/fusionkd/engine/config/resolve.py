"""Resolution of a run configuration from its layers. Order (later wins): the defaults of :class:`Config`
< the method's published recipe (``Method.recipe``) < a YAML file or shipped preset (``--config``) <
``key=value`` overrides / API keyword arguments; then :func:`validate` checks the result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ...errors import ConfigError
from .schema import Config
from .types import build_dataclass
from .validate import check_files, validate


def parse_override(text: str) -> tuple[str, Any]:
    """``"augment.flip=false"`` -> ``("augment.flip", False)``; values are read as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. epochs=10, options.peers=3)")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-").replace("-", "_")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key, read_value(raw)


def read_value(raw: str) -> Any:
    """A command-line value read as YAML (``3``, ``false``, ``[1, 2]``, ``{a: 1}``), plus the numbers YAML 1.1
    leaves as strings (``5e-4``, ``1e5``)."""
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:
            return int(value) if value.strip().lstrip("+-").isdigit() else float(value)
        except ValueError:
            return value
    if isinstance(value, list):
        return [read_value(v) if isinstance(v, str) else v for v in value]
    return value


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"augment.flip": False}`` -> ``{"augment": {"flip": False}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            existing = node.get(p)
            if existing is None:
                node[p] = existing = {}
            elif not isinstance(existing, dict):
                raise ConfigError(f"{key!r}: {p!r} is not a section")
            node = existing
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = deep_merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("options", "dataset_options"):
            out[key] = deep_merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's options; ``path`` may also be the name of a shipped preset (``fusionkd list``)."""
    from ...presets import list_presets, preset_path

    p = Path(path)
    if not p.is_file() and preset_path(str(path)) is not None:
        p = preset_path(str(path))
    if not p.is_file():
        names = ", ".join(x["name"] for x in list_presets())
        raise ConfigError(f"config file {str(p)!r} does not exist (nor is it a preset name: {names})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of options, got {type(data).__name__}")
    return data


def resolve_config(
    *layers: dict[str, Any] | None, config_file: str | Path | None = None, overrides: list[str] | None = None
) -> Config:
    """Merge ``layers`` (nested dicts, later wins), a YAML file and ``key=value`` overrides, insert the
    chosen method's recipe under them, then type-check and validate.

    The method's recipe is inserted just above the defaults, so anything the user states wins.
    """
    user: dict[str, Any] = {}
    if config_file is not None:
        user = deep_merge(user, load_yaml(config_file))
    for layer in layers:
        if layer:
            user = deep_merge(user, nest(layer))
    if overrides:
        user = deep_merge(user, nest(dict(parse_override(o) for o in overrides)))
    if user.get("plugins"):
        from ...plugins import load_files

        if not isinstance(user["plugins"], list):
            user["plugins"] = [user["plugins"]]
        user["plugins"] = load_files(user["plugins"])  # absolute paths: resume and workers load them again
    method_name = user.get("method", Config.method)
    recipe: dict[str, Any] = {}
    from ...methods import METHODS  # local import: methods depend on models, config must stay light

    if isinstance(method_name, str) and method_name in METHODS:
        recipe = dict(getattr(METHODS.get(method_name), "recipe", {}) or {})
    if user.get("optimizer", recipe.get("optimizer", Config.optimizer)) != "sgd":
        # a recipe's SGD settings (FFL's Nesterov momentum) belong to SGD: the user's optimizer wins over them
        recipe = {k: v for k, v in recipe.items() if k not in ("nesterov", "momentum")}
    cfg = build_dataclass(Config, deep_merge(nest(recipe), user))
    validate(cfg)
    check_files(cfg)
    return cfg
