"""The model registry: ``create_model("resnet20", num_classes=10, in_chans=1)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(name: str, description: str) -> Callable:
    """Decorator for a factory ``fn(num_classes: int, in_chans: int, **kwargs) -> Backbone``."""
    return MODELS.register(name, description)


def create_model(name: str, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """Build zoo model ``name``; raises :class:`fusionkd.registry.UnknownNameError` listing the
    accepted names when ``name`` is not registered."""
    return MODELS.get(name)(num_classes=num_classes, in_chans=in_chans, **kwargs)


def list_models() -> list[str]:
    """Names of the networks one can train (deploy-only entries, e.g. ``fused_peers``, left out)."""
    return [e.name for e in MODELS.entries() if not e.extras.get("deploy_only")]
