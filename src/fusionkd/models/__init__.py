"""The model zoo: CIFAR-style and ImageNet-family (torchvision-layout) backbones behind one contract
(see :mod:`fusionkd.models.base`).

``create_model("resnet20", num_classes=10, in_chans=1)`` builds a registered model; ``list_models()``
names them; :class:`HookBackbone` adapts a user's own ``nn.Module`` to the same contract.
"""

from __future__ import annotations

from importlib import import_module

from .base import Backbone, ClassifierHead, SplitNetwork, StageInfo, Tail, Trunk, stage_maps
from .hook import HookBackbone, HookHead
from .registry import MODELS, create_model, is_deploy_only, list_models, register_model
from .weights import WeightsError, WeightsReport, load_weights_file, read_state_dict

# importing a model module registers its models; this order is the order of ``list_models()``
ZOO_MODULES = ("resnet", "wrn", "vgg", "mobilenetv2", "imagenet")
for _module in ZOO_MODULES:
    import_module(f"{__name__}.{_module}")

from .adapt import adapt_module, infer_stages, is_staged, register_module  # noqa: E402
from .external import PREFIXES as EXTERNAL_PREFIXES  # noqa: E402  (registers the torchvision:/timm: resolvers)
from .tokens import TokenBackbone  # noqa: E402

__all__ = [
    "Backbone",
    "StageInfo",
    "ClassifierHead",
    "Trunk",
    "Tail",
    "SplitNetwork",
    "stage_maps",
    "MODELS",
    "create_model",
    "is_deploy_only",
    "register_model",
    "list_models",
    "HookBackbone",
    "HookHead",
    "TokenBackbone",
    "EXTERNAL_PREFIXES",
    "adapt_module",
    "infer_stages",
    "is_staged",
    "register_module",
    "load_weights_file",
    "read_state_dict",
    "WeightsError",
    "WeightsReport",
]
