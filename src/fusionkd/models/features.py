"""A timm network whose head does not read its last stage's output directly: :class:`FeaturesBackbone`.

Some timm CNNs and hierarchical transformers put layers between their last stage and the classifier: a head
norm (ConvNeXt), a 1x1 head convolution (EfficientNet, MobileNetV3), a final norm on channels-last maps
(Swin). Their stage outputs read through hooks then do not feed the head, and the contract
``forward_head(forward_stages(x)[-1]) == forward(x)`` breaks. timm's own API keeps it:

* the stage maps are the model's ``forward_intermediates`` (the stages of its ``feature_info`` from stride 4
  on, in NCHW), except the last, which is the output of its ``forward_features`` (its final features, after
  the head convolution or norm; channels-last outputs transposed to NCHW);
* ``forward_head(map)`` is the model's own ``forward_head`` (global pooling, norm, classifier), so it applies
  to any map of the final features' shape: a fused map, a branch's map. The online and self methods can use it.

Nothing here imports timm: the object only has to offer ``forward_intermediates``, ``forward_head`` and
``feature_info`` as timm models do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import StageInfo


def has_features_api(net: nn.Module) -> bool:
    """A timm-like model with ``forward_intermediates``, ``forward_head`` and ``feature_info``."""
    info = getattr(net, "feature_info", None)
    return callable(getattr(net, "forward_intermediates", None)) and callable(getattr(net, "forward_head", None)) \
        and isinstance(info, (list, tuple)) and len(info) >= 2 and all("reduction" in e for e in info)


class FeaturesHead(nn.Module):
    """What the methods that read ``net.head`` get: ``pooled`` is the model's pre-logits features."""

    def __init__(self, model: nn.Module, channels_last: bool) -> None:
        super().__init__()
        self.__dict__["model"] = model  # a reference, not a second registration of its parameters
        self.channels_last = channels_last
        self.num_features = int(getattr(model, "num_features", 0))

    pre_activates = False

    def _parts(self) -> None:
        raise ValueError(f"{type(self.model).__name__}'s head is timm's own forward_head (pooling, then a norm or "
                         "more before the classifier), not 'pre -> global pooling -> fc': a method that rebuilds "
                         "the head from those parts (byot) cannot use this network; the other methods can")

    @property
    def pre(self) -> nn.Module:
        self._parts()
        raise AssertionError  # unreachable

    @property
    def fc(self) -> nn.Module:
        self._parts()
        raise AssertionError  # unreachable

    @property
    def dropout(self) -> nn.Module:
        self._parts()
        raise AssertionError  # unreachable

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1) if self.channels_last else x
        return self.model.forward_head(x, pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1) if self.channels_last else x
        return self.model.forward_head(x)


class FeaturesBackbone(nn.Module):
    """A timm model (``forward_intermediates`` + ``forward_head``) on the backbone contract.

    Args:
        module: the network; its state dict keys are ``module.<own key>``.
        head_name: its classifier (from ``get_classifier``), for weights files.
    """

    def __init__(self, module: nn.Module, head_name: str) -> None:
        super().__init__()
        if not has_features_api(module):
            raise TypeError(f"{type(module).__name__} has no forward_intermediates / forward_head / feature_info")
        self.module = module
        self.head_name = head_name
        info = list(module.feature_info)
        # the stages from stride 4 on (a stride-2 stem is not a stage in fusionkd), the last one as final features
        self.indices = [i for i, e in enumerate(info[:-1]) if int(e["reduction"]) >= 4]
        self.channels_last = str(getattr(module, "output_fmt", "NCHW")) == "NHWC"
        self.num_classes = int(getattr(module, "num_classes", 0))
        self.in_chans = int(getattr(module, "in_chans", 3))
        names = [str(info[i]["module"]) for i in self.indices] + ["forward_features"]
        chans = [int(info[i]["num_chs"]) for i in self.indices] + [int(module.num_features)]
        strides = [int(info[i]["reduction"]) for i in self.indices] + [int(info[-1]["reduction"])]
        self.stage_info = [StageInfo(n, c, s) for n, c, s in zip(names, chans, strides, strict=True)]

    @property
    def num_stages(self) -> int:
        return len(self.stage_info)

    @property
    def num_features(self) -> int:
        return int(self.module.num_features)

    @property
    def classifier_key(self) -> str:
        return f"module.{self.head_name}"

    @property
    def head(self) -> FeaturesHead:
        return FeaturesHead(self.module, self.channels_last)

    def forward(self, x: torch.Tensor) -> Any:
        return self.module(x)

    def forward_stages(self, x: torch.Tensor, raw: bool = False) -> list[torch.Tensor]:
        """``[(B, C_i, H_i, W_i)]``: the intermediate stages, then the final features (``raw``: the same)."""
        final, maps = self.module.forward_intermediates(x, indices=self.indices, norm=False, output_fmt="NCHW")
        final = final.permute(0, 3, 1, 2) if self.channels_last else final
        return [*maps, final]

    def forward_stages_both(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        maps = self.forward_stages(x)
        return maps, maps

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """The model's own head (pooling, norm, classifier) on a map of the final features' shape (called every
        step: no :class:`FeaturesHead` is built here)."""
        return self.module.forward_head(x.permute(0, 2, 3, 1) if self.channels_last else x)

    def split(self, at_stage: int) -> tuple[nn.Module, nn.Module]:
        raise TypeError("a timm network read through forward_intermediates cannot be split into trunk and tail: "
                        "methods that grow branches on a shared trunk (ffl_s, one) need a zoo network")
