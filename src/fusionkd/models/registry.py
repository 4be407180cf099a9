"""The model registry: ``create_model("resnet20", num_classes=10, in_chans=1)``."""

from __future__ import annotations

import inspect
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


#: keyword arguments fusionkd sets itself: the classes and channels from the data, ``pretrained`` from its key
RESERVED_KWARGS = ("num_classes", "in_chans", "pretrained")


def model_extras(name: str, kwargs: dict[str, Any] | None, key: str = "model_kwargs") -> dict[str, Any]:
    """Check that model ``name`` takes the keyword arguments ``kwargs`` (config ``key``) and return its
    registry extras as they are with them (a timm ViT's ``image_size`` follows its ``img_size``).

    A factory with a ``check_kwargs(kwargs, key)`` method (``torchvision:``/``timm:`` names) checks them
    itself; any other (the zoo, registered objects) takes the keywords of its signature other than
    ``num_classes``/``in_chans`` (``dropout`` of ``wrn_*``, ``batch_norm`` of ``vgg*``...).

    Raises:
        ValueError: a key the model does not take, or one fusionkd sets itself, named.
    """
    entry = MODELS.entry(name)
    extras = dict(entry.extras)
    kwargs = dict(kwargs or {})
    if not kwargs:
        return extras
    reserved = [k for k in kwargs if k in RESERVED_KWARGS]
    if reserved:
        raise ValueError(f"{key}: {reserved[0]!r} is set by fusionkd, not passed on (num_classes and in_chans "
                         "come from the data; pretrained=true is a config key of its own)")
    check = getattr(entry.obj, "check_kwargs", None)
    if callable(check):  # what the network is with these keywords replaces what it is with the defaults
        extras = {k: v for k, v in extras.items() if k not in ("tokens", "image_size")}
        return {**extras, **check(kwargs, key)}
    try:
        params = inspect.signature(entry.obj).parameters
    except (TypeError, ValueError):  # no signature to read: the factory itself decides when called
        return extras
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return extras
    accepted = [n for n, p in params.items() if n not in ("num_classes", "in_chans")
                and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    bad = [k for k in kwargs if k not in accepted]
    if bad:
        raise ValueError(f"{key}: model {name!r} takes no keyword argument {bad[0]!r} (it accepts "
                         f"{', '.join(accepted) or 'none'}); package keyword arguments such as img_size or "
                         "drop_rate are for torchvision:NAME and timm:NAME networks")
    return extras


def is_deploy_only(name: str) -> bool:
    """Whether zoo entry ``name`` only rebuilds a deployed network (``fusionkd eval/export``, e.g.
    ``fused_peers``, registered with ``deploy_only=True``) and cannot be trained."""
    return name in MODELS and bool(MODELS.entry(name).extras.get("deploy_only"))


def list_models() -> list[str]:
    """Names of the networks one can train (deploy-only entries, e.g. ``fused_peers``, left out)."""
    return [e.name for e in MODELS.entries() if not e.extras.get("deploy_only")]
