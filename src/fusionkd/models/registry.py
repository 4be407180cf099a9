"""The model registry: ``create_model("resnet20", num_classes=10, in_chans=1)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import PluginError
from ..registry import Registry


def adopt_factory(name: str, obj: Any, doc: str) -> None:
    """An entry point of ``fusionkd.models`` that names a model factory: registered under ``name``."""
    if not callable(obj):
        raise PluginError(f"entry point {name!r} of fusionkd.models must name a module or a model factory")
    if name not in MODELS:
        register_model(name, doc)(obj)


MODELS: Registry[Callable[..., nn.Module]] = Registry("model", adopt=adopt_factory)


def register_model(name: str, description: str) -> Callable:
    """Decorator for a factory ``fn(num_classes: int, in_chans: int, **kwargs) -> Backbone``."""
    return MODELS.register(name, description)


def create_model(name: str, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """Build zoo model ``name``; raises :class:`fusionkd.registry.UnknownNameError` listing the
    accepted names when ``name`` is not registered."""
    return MODELS.get(name)(num_classes=num_classes, in_chans=in_chans, **kwargs)


def is_deploy_only(name: str) -> bool:
    """Whether zoo entry ``name`` only rebuilds a deployed network (``fusionkd eval/export``, e.g.
    ``fused_peers``, registered with ``deploy_only=True``) and cannot be trained."""
    return name in MODELS and bool(MODELS.entry(name).extras.get("deploy_only"))


def list_models() -> list[str]:
    """Names of the networks one can train (deploy-only entries, e.g. ``fused_peers``, left out)."""
    return [e.name for e in MODELS.entries() if not e.extras.get("deploy_only")]
