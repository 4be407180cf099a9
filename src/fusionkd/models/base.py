"""The one contract every backbone in fusionkd satisfies.

A backbone is ``stem -> stages[0] -> ... -> stages[n-1] -> head``:

* ``forward_stages(x)`` returns the output map of every stage, in order, each ``(B, C_i, H_i, W_i)``;
* ``forward_head(last_map)`` turns the last stage map into logits ``(B, num_classes)``;
* ``forward(x) == forward_head(forward_stages(x)[-1])``;
* ``stage_info`` describes each stage (channels, stride relative to the input) as data, so that fusion
  modules, self-teachers and branches are built from metadata instead of hard-coded channel counts;
* ``split(k)`` cuts the network into a shared trunk (stem + stages[:k]) and a copyable tail
  (stages[k:] + head), which FFL-S and ONE use to grow several branches on one trunk.

Models in the zoo subclass :class:`Backbone` and only have to build ``stem``, ``stages`` and ``head``.
A user's own ``nn.Module`` is adapted to the same contract with :class:`fusionkd.models.HookBackbone`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class StageInfo:
    """Metadata of one stage output.

    Attributes:
        name: module path of the stage inside the backbone (e.g. ``"stages.1"``).
        channels: number of channels ``C`` of the stage's output map.
        stride: total down-sampling of the stage's output relative to the input image
            (a 32x32 input and stride 4 give an 8x8 map).
    """

    name: str
    channels: int
    stride: int


class ClassifierHead(nn.Module):
    """``pre`` (optional, e.g. the final BN-ReLU of a pre-activation net) -> global average pool -> FC.

    Args:
        in_channels: channels of the last stage map.
        num_classes: number of output logits.
        pre: module applied to the map before pooling (identity when ``None``).
        features: channels after ``pre`` (defaults to ``in_channels``).
        dropout: dropout probability before the FC layer.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        pre: nn.Module | None = None,
        features: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.pre = pre if pre is not None else nn.Identity()
        self.num_features = features if features is not None else in_channels
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(self.num_features, num_classes)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, num_features)``: the vector the FC layer sees."""
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.pre(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.pooled(x)))


class Backbone(nn.Module):
    """Base class of every zoo model: ``stem``, ``stages`` (``nn.ModuleList``) and ``head``.

    Subclasses build the three parts in ``__init__`` and then call :meth:`_finish` with the channel
    count and stride of each stage. Nothing else is needed for the whole contract to work.
    """

    stem: nn.Module
    stages: nn.ModuleList
    head: ClassifierHead
    #: dotted state-dict prefix of the final linear layer (``weights=`` replaces it for another class count)
    classifier_key = "head.fc"

    def __init__(self, num_classes: int, in_chans: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.stage_info: list[StageInfo] = []

    def _finish(self, channels: list[int], strides: list[int]) -> None:
        if len(channels) != len(self.stages) or len(strides) != len(self.stages):
            raise ValueError("one channel count and one stride per stage are needed")
        self.stage_info = [
            StageInfo(f"stages.{i}", c, s) for i, (c, s) in enumerate(zip(channels, strides, strict=True))
        ]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_features(self) -> int:
        """Width of the pooled feature vector that enters the final FC layer."""
        return self.head.num_features

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, in_chans, H, W)`` -> list of ``(B, C_i, H_i, W_i)``, one map per stage."""
        x = self.stem(x)
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Last stage map ``(B, C, H, W)`` -> logits ``(B, num_classes)``."""
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

    def split(self, at_stage: int) -> tuple[Trunk, Tail]:
        """Cut into ``Trunk(stem + stages[:at_stage])`` and ``Tail(stages[at_stage:] + head)``.

        The parts share parameters with this backbone (no copy); ``copy.deepcopy(tail)`` makes an
        independent branch. ``1 <= at_stage < num_stages`` so that both parts hold a stage.
        """
        if not 1 <= at_stage < self.num_stages:
            raise ValueError(
                f"split stage must be between 1 and {self.num_stages - 1} for this "
                f"{self.num_stages}-stage backbone, got {at_stage}"
            )
        trunk = Trunk(self.stem, list(self.stages[:at_stage]), self.stage_info[:at_stage])
        tail = Tail(list(self.stages[at_stage:]), self.head, self.stage_info[at_stage:], self.num_classes)
        return trunk, tail


class Trunk(nn.Module):
    """The shared lower part of a split backbone: ``stem`` and the first stages."""

    def __init__(self, stem: nn.Module, stages: list[nn.Module], info: list[StageInfo]) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.stage_info = list(info)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[-1]


class Tail(nn.Module):
    """The copyable upper part of a split backbone: the last stages and the classifier head.

    It satisfies the same ``forward_stages`` / ``forward_head`` contract as a backbone, with the
    trunk's output map as its input.
    """

    def __init__(
        self, stages: list[nn.Module], head: ClassifierHead, info: list[StageInfo], num_classes: int
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.head = head
        self.stage_info = list(info)
        self.num_classes = num_classes

    @property
    def num_features(self) -> int:
        return self.head.num_features

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_stages(x)[-1])


class SplitNetwork(nn.Module):
    """A trunk and one tail put back together as a plain network (what FFL-S and ONE deploy).

    It satisfies the backbone contract: ``forward_stages`` returns the trunk's and the tail's maps.
    """

    def __init__(self, trunk: Trunk, tail: Tail) -> None:
        super().__init__()
        self.trunk = copy.deepcopy(trunk)
        self.tail = copy.deepcopy(tail)
        self.stage_info = list(trunk.stage_info) + list(tail.stage_info)
        self.num_classes = tail.num_classes

    @property
    def num_features(self) -> int:
        return self.tail.num_features

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.trunk.forward_stages(x)
        return maps + self.tail.forward_stages(maps[-1])

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail.forward_head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.trunk(x))
