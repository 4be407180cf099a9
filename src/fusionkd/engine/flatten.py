"""Dotted keys for nested dicts (configs): what the MLflow tracker logs as parameters and what
``fusionkd compare`` compares and groups runs by."""

from __future__ import annotations

from typing import Any

__all__ = ["flatten"]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"augment": {"flip": True}}`` -> ``{"augment.flip": True}`` (the method's ``options`` too)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
