"""A user's own network object as a model of the run: :func:`adapt_module` and :func:`register_module`.

``fusionkd.train(model=my_net, ...)`` and ``teacher_model=my_net`` go through here. The object may be

* a fusionkd :class:`~fusionkd.models.Backbone` (a zoo model) or a :class:`~fusionkd.models.HookBackbone`
  (a module plus the names of its stage outputs and its head): used as it is;
* any other ``nn.Module``: its stages are inferred from timm's ``feature_info`` (the last module of each
  stride from 4 on) and its head from ``get_classifier()``; a torchvision-style ResNet (``layer1..4`` and
  ``fc``) is recognised by its names. Anything else needs ``HookBackbone(module, stage_names, head_name)``.

Nothing here imports torchvision or timm: the object only has to look like their models.

:func:`register_module` puts a factory for the object into the model registry under a name (default
``user-<classname>``), so that configs, run folders, checkpoints and resumes refer to it by name like any
zoo model. Each network made from it is an independent deep copy (peers start from the same weights as
the object). The registration lives in the Python process: a run with a registered module is resumed, or
its checkpoint rebuilt, after registering the module again under the same name.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from .hook import HookBackbone
from .registry import MODELS

log = logging.getLogger("fusionkd")

USER_PREFIX = "user-"


def is_staged(net: nn.Module) -> bool:
    """Whether ``net`` satisfies the stage contract every stage-reading method needs: ``forward_stages``,
    ``forward_head``, ``stage_info`` and a head with ``pooled``."""
    return all(hasattr(net, a) for a in ("forward_stages", "forward_head", "stage_info")) \
        and hasattr(getattr(net, "head", None), "pooled")


def _module_name(root: nn.Module, target: nn.Module) -> str | None:
    for name, m in root.named_modules():
        if m is target and name:
            return name
    return None


def infer_stages(module: nn.Module) -> tuple[list[str], str]:
    """``(stage_names, head_name)`` of a timm-like (``feature_info``) or torchvision-ResNet-like module."""
    info = getattr(module, "feature_info", None)
    entries = list(info) if isinstance(info, (list, tuple)) else list(getattr(info, "info", None) or [])
    if entries and all(isinstance(e, dict) and "module" in e and "reduction" in e for e in entries):
        by_stride: dict[int, str] = {}
        for e in entries:
            if int(e["reduction"]) >= 4:
                by_stride[int(e["reduction"])] = str(e["module"])
        stages = [by_stride[s] for s in sorted(by_stride)]
        head = None
        get = getattr(module, "get_classifier", None)
        if callable(get):
            clf = get()
            head = _module_name(module, clf) if isinstance(clf, nn.Module) else None
        if head is None and isinstance(getattr(module, "fc", None), nn.Module):
            head = "fc"
        if stages and head:
            return stages, head
    names = dict(module.named_children())
    if all(f"layer{i}" in names for i in range(1, 5)) and isinstance(names.get("fc"), nn.Linear):
        return [f"layer{i}" for i in range(1, 5)], "fc"
    shown = ", ".join(list(names)[:20]) or "(none)"
    raise ValueError(
        f"cannot tell the stages of {type(module).__name__}: it has no timm feature_info and is not a "
        f"torchvision-style ResNet (layer1..layer4 + fc). Wrap it as fusionkd.models.HookBackbone(module, "
        f"stage_names=[...], head_name='...') with names from module.named_modules() (its children: {shown})")


def adapt_module(module: nn.Module, in_chans: int = 3, input_size: int = 32) -> nn.Module:
    """``module`` on the backbone contract (itself when it already is; else a :class:`HookBackbone` with
    stages inferred by :func:`infer_stages`, dry-run at ``(in_chans, input_size, input_size)``)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(module).__name__}")
    if is_staged(module):
        return module
    stages, head = infer_stages(module)
    return HookBackbone(module, stages, head, input_shape=(in_chans, input_size, input_size))


def _replace_head(net: nn.Module, num_classes: int, name: str) -> nn.Module:
    """``net`` with its final linear layer replaced by a fresh one of ``num_classes`` outputs."""
    key = getattr(net, "classifier_key", None)
    try:
        old = net.get_submodule(key) if isinstance(key, str) else None
    except AttributeError:
        old = None
    if not isinstance(old, nn.Linear):
        raise ValueError(f"{name} predicts {getattr(net, 'num_classes', '?')} classes and its head is not a "
                         f"linear layer that can be replaced; this run has {num_classes} classes")
    parent_name, _, attr = key.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    fresh = nn.Linear(old.in_features, num_classes, bias=old.bias is not None).to(old.weight.device,
                                                                                  old.weight.dtype)
    setattr(parent, attr, fresh)
    log.info("%s: classifier %r replaced (%d -> %d classes, fresh initialisation)", name, key, old.out_features,
             num_classes)
    if isinstance(net, HookBackbone):
        net = net.rebuilt()
    else:
        net.num_classes = num_classes
    return net


class ModuleFactory:
    """The registered factory of a user object: ``factory(num_classes, in_chans)`` -> a deep copy on the
    contract, its classifier replaced when the class count differs (unless ``replace_classifier=False``)."""

    def __init__(self, name: str, module: nn.Module, input_size: int) -> None:
        self.name = name
        self.module = module
        self.input_size = input_size

    def __call__(self, num_classes: int, in_chans: int, replace_classifier: bool = True) -> nn.Module:
        obj = copy.deepcopy(self.module)
        try:
            net = adapt_module(obj, in_chans, self.input_size)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"model {self.name!r} ({type(self.module).__name__}) cannot run on {in_chans}-channel "
                             f"{self.input_size}x{self.input_size} images: {e}") from e
        own_chans = getattr(net, "in_chans", in_chans)
        if own_chans != in_chans:
            raise ValueError(f"model {self.name!r} takes {own_chans}-channel images but this run's data has "
                             f"{in_chans} channels")
        if getattr(net, "num_classes", num_classes) != num_classes:
            if not replace_classifier:
                raise ValueError(f"model {self.name!r} predicts {net.num_classes} classes but this run has "
                                 f"{num_classes}; a teacher must predict the run's classes")
            net = _replace_head(net, num_classes, f"model {self.name!r}")
        return net


def register_module(module: nn.Module, name: str | None = None, input_size: int = 32) -> str:
    """Register a user's network object in the model registry and return its name.

    Args:
        module: the network (see the module docstring for what is accepted).
        name: registry name; default ``user-<classname>`` (lower case). Names of zoo models are refused;
            registering a name again replaces the earlier object.
        input_size: side of the dry-run input of a :class:`HookBackbone` built here (stage strides are
            measured on it).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nn.Module to register, got {type(module).__name__}")
    adapt_module(module, _in_chans_of(module), input_size)  # fail now, naming what is wrong
    name = name or f"{USER_PREFIX}{type(module).__name__.lower()}"
    if name in MODELS and not MODELS.entry(name).extras.get("user"):
        raise ValueError(f"{name!r} is a zoo model; register the module under another name")
    MODELS.replace(name, ModuleFactory(name, module, input_size),
                   f"user module {type(module).__name__} (registered in this process)", user=True)
    return name


def _in_chans_of(module: nn.Module) -> int:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return int(getattr(module, "in_chans", 3))


def user_model_names(models: Sequence[Any]) -> list[str]:
    """Names for a list of zoo names and/or module objects (objects get registered)."""
    return [m if isinstance(m, str) else register_module(m) for m in models]
