"""The one contract every backbone in fusionkd satisfies.

A backbone is ``stem -> stages[0] -> ... -> stages[n-1] -> head``:

* ``forward_stages(x)`` returns the map of every stage, in order, each ``(B, C_i, H_i, W_i)``;
* ``forward_head(last_map)`` turns the last stage map into logits ``(B, num_classes)``;
* ``forward(x) == forward_head(forward_stages(x)[-1])``;
* ``stage_info`` describes each stage (channels, stride relative to the input) as data, so that fusion
  modules, self-teachers and branches are built from metadata instead of hard-coded channel counts;
* ``split(k)`` cuts the network into a shared trunk (stem + stages[:k]) and a copyable tail
  (stages[k:] + head), which FFL-S and ONE use to grow several branches on one trunk.

Models in the zoo subclass :class:`Backbone` and only have to build ``stem``, ``stages`` and ``head``.
A user's own ``nn.Module`` is adapted to the same contract with :class:`fusionkd.models.HookBackbone`.

**Which map is a stage map (one rule for every network and method).** The map offered for stage ``i``
is the tensor that the next weight layer reads, at stage ``i``'s resolution: the output of stage ``i``
*after* whatever normalisation and activation the next layer applies before its first weight (a
weight-free down-sampling in between, such as VGG's max-pool, is left to the reader). For post-activation networks
(ResNets, VGG: every stage ends in a ReLU) that is the stage output itself; for pre-activation networks
(the WRNs) it is ``relu(bn(sum))``, computed by the BN-ReLU that opens the next block (or the head's final
BN-ReLU for the last stage), exactly the per-stage map of the FRSKD authors' WRN. That BN-ReLU is run once
per forward and its output feeds both the method and the network, so the network computes what it always
did (same state-dict keys, same logits, BatchNorm statistics updated once). MobileNetV2's stages end in
linear bottlenecks that the next 1x1 expansion reads directly, so its maps are signed by design.
``forward_stages(x, raw=True)`` gives the raw stage outputs (the residual sums of a pre-activation network)
for a method whose paper asks for them, and :func:`stage_maps` both lists from one forward;
``forward_head`` always takes the rule's map.

A stage that opens with such an activation says so with ``pre_activates = True``, provides ``activate(x)``
(the activation alone) and takes ``forward(x, act)`` with ``act = activate(x)`` already computed; a head
does the same with ``activate`` and ``forward(act, activated=True)``. :func:`run_stages` uses them so that
the activation runs once (and through ``__call__``, so compiled stages stay compiled).
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


def pre_activates(module: nn.Module | None) -> bool:
    """Whether ``module`` (a stage or a head) opens with an activation that the stage map rule exposes."""
    return module is not None and bool(getattr(module, "pre_activates", False))


def run_stages(
    stages: list[nn.Module], x: torch.Tensor, after: nn.Module | None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run ``stages`` on ``x``; return ``(maps, raw)``: the stage maps under the module docstring's rule,
    and the raw stage outputs (the same tensors where no activation follows).

    ``after`` is the module that reads the last stage's output (the head of a whole network, ``None`` for a
    trunk whose reader lies outside it). Where the next module pre-activates, its activation is computed
    here once, offered as the stage map and handed to that module (``stage(x, act)``).
    """
    maps: list[torch.Tensor] = []
    raws: list[torch.Tensor] = []
    act: torch.Tensor | None = None
    for i, stage in enumerate(stages):
        x = stage(x, act) if act is not None else stage(x)
        nxt = stages[i + 1] if i + 1 < len(stages) else after
        act = nxt.activate(x) if pre_activates(nxt) else None
        raws.append(x)
        maps.append(x if act is None else act)
    return maps, raws


def stage_maps(net: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(maps, raw)`` of ``net`` in one forward: the contract's stage maps (pass ``maps[-1]`` to
    ``forward_head``) and the raw stage outputs, for a method that reads the raw maps (e.g. AT on a WRN, as
    in its paper's code) and still needs the logits. Networks without a separate raw map (post-activation
    or adapted ones) give the same list twice."""
    both = getattr(net, "forward_stages_both", None)
    if both is not None:
        return both(x)
    maps = net.forward_stages(x)
    return maps, maps


class ClassifierHead(nn.Module):
    """``pre`` (optional) -> global average pool -> FC.

    Args:
        in_channels: channels of the last stage map.
        num_classes: number of output logits.
        pre: module applied to the map before pooling (identity when ``None``).
        features: channels after ``pre`` (defaults to ``in_channels``).
        dropout: dropout probability before the FC layer.
        pre_activates: ``pre`` is a weight-free activation (the final BN-ReLU of a pre-activation net), so
            the last stage map is offered after it and ``forward(map, activated=True)`` skips it; ``False`` when
            ``pre`` holds weights (MobileNetV2's 1x1 conv to 1280 channels), which then stay in the head.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        pre: nn.Module | None = None,
        features: int | None = None,
        dropout: float = 0.0,
        pre_activates: bool = False,
    ) -> None:
        super().__init__()
        self.pre = pre if pre is not None else nn.Identity()
        self.pre_activates = bool(pre_activates and pre is not None)
        self.num_features = features if features is not None else in_channels
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(self.num_features, num_classes)

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        """The activation that opens the head (``pre``); offered as the last stage map."""
        return self.pre(x)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The vector the FC layer sees, from the stage map rule's last map: ``(B, C, H, W) ->
        (B, num_features)`` (``pre`` is applied here only when it is not an exposed activation)."""
        if not self.pre_activates:
            x = self.pre(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the stage map rule's last map (what ``forward_stages`` offers)."""
        return self(x, activated=True)

    def forward(self, x: torch.Tensor, activated: bool = False) -> torch.Tensor:
        """Logits from the raw last stage output, or (``activated=True``) from the rule's last map.
        (One entry point, so that a compiled head serves both.)"""
        if not (self.pre_activates and activated):
            x = self.pre(x)
        return self.fc(self.dropout(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))


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

    def forward_stages(self, x: torch.Tensor, raw: bool = False) -> list[torch.Tensor]:
        """``(B, in_chans, H, W)`` -> list of ``(B, C_i, H_i, W_i)``, one map per stage (the module
        docstring's rule; ``raw=True``: the raw stage outputs)."""
        return self.forward_stages_both(x)[1 if raw else 0]

    def forward_stages_both(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(maps, raw)`` from one forward (see :func:`run_stages`)."""
        return run_stages(list(self.stages), self.stem(x), self.head)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Last stage map ``(B, C, H, W)`` (as ``forward_stages`` offers it) -> logits ``(B, num_classes)``."""
        return self.head.classify(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_stages(x)[-1])

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

    def forward_stages(self, x: torch.Tensor, raw: bool = False) -> list[torch.Tensor]:
        """The trunk's stage maps. Its last map is raw: what reads it (each branch's first stage) lies
        outside the trunk, and on a pre-activation network every branch applies its own BN-ReLU to it."""
        return self.forward_stages_both(x)[1 if raw else 0]

    def forward_stages_both(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return run_stages(list(self.stages), self.stem(x), None)

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

    def forward_stages(self, x: torch.Tensor, raw: bool = False) -> list[torch.Tensor]:
        """The tail's stage maps from the trunk's raw output ``x``."""
        return self.forward_stages_both(x)[1 if raw else 0]

    def forward_stages_both(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return run_stages(list(self.stages), x, self.head)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.classify(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_stages(x)[-1])


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

    def forward_stages(self, x: torch.Tensor, raw: bool = False) -> list[torch.Tensor]:
        return self.forward_stages_both(x)[1 if raw else 0]

    def forward_stages_both(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        stages = list(self.trunk.stages) + list(self.tail.stages)
        return run_stages(stages, self.trunk.stem(x), self.tail.head)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail.forward_head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.trunk(x))
