"""torchvision families whose forward runs more than pooling between the last stage and the classifier.

A :class:`~fusionkd.models.HookBackbone` offers the stage maps of a torchvision network through hooks, and
``forward_head(map)`` must give the network's own logits for its last stage map (and, for the fusion methods,
for any map of that shape). For ResNet, MobileNet, EfficientNet, MNASNet and RegNet that head is ``global
pooling -> classifier``. The families here put more in between; each entry names what, as a *tail*
(``tail(model, last_map) -> the vector entering the final linear layer``), written from the family's own
``forward`` in torchvision 0.29:

* ConvNeXt: ``avgpool -> classifier[0] (LayerNorm2d) -> classifier[1] (flatten)``, then ``classifier[2]``;
* Swin (v1 and v2): stages output channels-last ``(B, H, W, C)`` tensors (offered permuted to NCHW), then
  ``norm -> permute -> avgpool -> flatten``, then ``head``;
* DenseNet: ``relu -> global pooling -> flatten`` (its forward's ReLU is in place, on the map ``features``
  returns, so the stage map is read before it runs), then ``classifier``;
* VGG and AlexNet: ``avgpool (to 7x7 / 6x6) -> flatten -> classifier[:-1]`` (two fully connected layers with
  ReLU and dropout), then ``classifier[-1]``;
* MaxViT: ``classifier[:-1]`` (pool, flatten, LayerNorm, Linear, Tanh), then ``classifier[-1]``;
* ShuffleNetV2: its head is the usual ``mean over H, W -> fc``; what it lacks is a ``features`` sequence, so
  its stages are named here.

Refused, with the reason: SqueezeNet (its classifier is a convolution applied *before* the pooling, so there
is no vector for a linear head), GoogLeNet and Inception v3 (auxiliary classifiers that change the output
type in training mode, and an input transform in the forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .hook import Tail


def convnext_tail(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.classifier[1](model.classifier[0](model.avgpool(x)))


def swin_tail(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.flatten(model.avgpool(model.permute(model.norm(x.permute(0, 2, 3, 1)))))


def densenet_tail(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(F.adaptive_avg_pool2d(F.relu(x), 1), 1)


def vgg_tail(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = torch.flatten(model.avgpool(x), 1)
    for layer in list(model.classifier)[:-1]:
        x = layer(x)
    return x


def maxvit_tail(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for layer in list(model.classifier)[:-1]:
        x = layer(x)
    return x


@dataclass(frozen=True)
class Family:
    """How a torchvision class goes on the contract: its tail and classifier, and its stages where the
    generic search (the last block of each stride in ``features``) does not find them."""

    tail: Tail | None
    head: str
    stages: tuple[str, ...] = ()  #: explicit stage modules; empty: searched in ``features``
    stage_format: str = "NCHW"


SWIN = Family(swin_tail, "head", ("features.1", "features.3", "features.5", "features.7"), "NHWC")
FAMILIES: dict[str, Family] = {
    "ConvNeXt": Family(convnext_tail, "classifier.2"),
    "SwinTransformer": SWIN,
    "DenseNet": Family(densenet_tail, "classifier"),
    "VGG": Family(vgg_tail, "classifier.6"),
    "AlexNet": Family(vgg_tail, "classifier.6"),
    "MaxVit": Family(maxvit_tail, "classifier.5", ("blocks.0", "blocks.1", "blocks.2", "blocks.3")),
    "ShuffleNetV2": Family(None, "fc", ("maxpool", "stage2", "stage3", "conv5")),
}

REFUSED: dict[str, str] = {
    "SqueezeNet": "its classifier is a 1x1 convolution applied before the global pooling, so no linear head reads "
                  "a pooled vector that fused or branch maps could be given",
    "GoogLeNet": "its auxiliary classifiers change its output in training mode and its forward transforms the "
                 "input first",
    "Inception3": "its auxiliary classifier changes its output in training mode and its forward transforms the "
                  "input first",
}
