"""``byot``: Be Your Own Teacher (Zhang et al., "Be Your Own Teacher: Improve the Performance of
Convolutional Neural Networks via Self Distillation", ICCV 2019).

A classifier branch is attached after every non-final stage of the backbone; the deepest classifier
(the backbone's own head) teaches every branch with soft labels, and every branch's pooled feature
vector is pulled towards the deepest one (METHODS.md section 0):

    L = (1 - alpha) * [CE(z_L) + sum_i CE(z_i)]
        + alpha * sum_i KL(softmax(z_L / T) || softmax(z_i / T))
        + lambda * sum_i mean_b || f_i - f_L.detach() ||^2,      alpha = 0.1, lambda = 1e-6, T = 3,

with ``i`` over the branches, ``z`` logits and ``f`` the pooled vectors that enter each FC layer.

**Source.** This is Eq. (1) of the ICCV 2019 paper, ``sum_{i=1..C} [(1 - alpha) CE(q^i, y) + alpha
KL(q^i, q^C) + lambda ||F_i - F_C||^2]``: the sum runs over every classifier including the deepest one
(``i = C``, whose KL and feature terms vanish), so the deepest CE carries ``1 - alpha`` too, and the KL has
no ``T^2`` factor. Where the code people run differs, we follow the paper (the spec's equation, and the
only statement of the method that its authors published for this version); the differences are options
(all but the last, which options reach only in part):

* the authors' own release (``ArchipLab-LinfengZhang/pytorch-self-distillation-final``, the journal
  version) weighs the deepest CE by 1 (``deep_ce_weight=1``), uses the soft-target cross-entropy (same
  gradient as the KL: they differ by the detached teacher's entropy), no ``T^2``, ``alpha = 0.3`` and no
  feature term (``feature_weight=0``);
* the widely used third-party re-implementation (``luanyunteng/pytorch-be-your-own-teacher``) multiplies
  the soft-target term by ``T^2`` (``t_squared=true``: x9 at T = 3) and sums a masked squared feature
  difference over the batch;
* Self-KD-Lib (``winycg/Self-KD-Lib``, ``methods/byot.py``) is reachable **only as half of it**: its loss
  is ``sum over every head of CE + sum_i T^2 KL(softmax(z_L / T) || softmax(z_i / T))`` (T = 4, every weight
  1) ``+ 0.05 * sum_i mean((F_i - F_L.detach())^2)`` over the unpooled last maps. A branch's CE and KL
  weights here are ``1 - alpha`` and ``alpha``, summing to 1, so ``alpha=0.5 t_squared=true temperature=4
  feature_weight=0`` gives exactly half its CE + KD terms (with SGD, ``lr`` x 2 and ``weight_decay`` / 2
  give the same updates as the full terms); its feature term (on 4-D maps) and its branches (copies of the
  ResNet's own later layers) have no counterpart.

Branch layout (the released code's ``branchBottleNeck``, built here from ``stage_info``): 1x1 conv
(C_i -> D/4) BN ReLU -> k x k conv stride k (down to the deepest map's H x W) BN ReLU -> 1x1 conv
(D/4 -> D) BN ReLU -> GAP -> FC, where ``D = num_features`` of the backbone (the width of the deepest
pooled vector, = C_L for the ResNets, WRNs and VGGs), so that ``f_i`` and ``f_L`` have one size.

Heads: ``branch1 .. branch{L-1}`` (shallow to deep) and ``net`` (the deepest classifier).
Deploy: the backbone alone (branches dropped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models import StageInfo, is_staged
from ..models.layers import init_weights
from .base import Method, MethodContext, NetDeployment, register_method
from .losses import kl_div


def stage_sizes(stage_info: list[StageInfo], image_size: int) -> list[int]:
    """Side of each stage map for a square ``image_size`` input: ``ceil(image_size / stride)``.

    Every zoo down-sampling (3x3 stride-2 conv with padding 1, ceil-mode max-pool) rounds up, so a
    28x28 input gives 28/14/7 for ResNet-20 and 28/14/7/4 for ResNet-18.
    """
    return [math.ceil(image_size / s.stride) for s in stage_info]


def check_self_backbone(net: nn.Module, method: str) -> None:
    """Self-distillation needs a network on the stage contract (a zoo backbone, or a user module adapted
    with :class:`~fusionkd.models.HookBackbone`) with at least two stages."""
    if not is_staged(net):
        raise ValueError(f"{method} reads stage maps, so it needs a zoo backbone or a module adapted with "
                         f"fusionkd.models.HookBackbone (stage names + head); got {type(net).__name__}")
    if getattr(net, "pool", True) is False:
        raise ValueError(f"{method} pools the deepest map before the head (as its branches do), so an adapted "
                         "module needs HookBackbone(..., pool=True)")
    if net.num_stages < 2:
        raise ValueError(
            f"{method} attaches a branch after every non-final stage, so it needs a backbone with at least "
            f"two stages; {type(net).__name__} has {net.num_stages}"
        )


class BottleneckBranch(nn.Module):
    """BYOT's auxiliary branch body: a bottleneck that brings stage map ``i`` to the deepest map's shape.

    ``1x1 conv (C_in -> C_out/4) BN ReLU -> k x k conv, stride k BN ReLU -> 1x1 conv (-> C_out) BN ReLU``
    (Zhang et al. 2019, released code ``branchBottleNeck``), ``(B, C_in, H_i, W_i) -> (B, C_out, H_L, W_L)``.

    ``k = max(1, H_i // H_L)`` per side. When ``H_L`` does not divide ``H_i`` (e.g. ResNet-18 at 28x28:
    14 -> 4 and 7 -> 4), the strided conv gives ``floor(H_i / k)`` and an adaptive average pool brings it
    to ``H_L`` (our choice; the paper only uses sizes that divide). The target size is taken from the
    deepest map at run time, so a mismatch between predicted and actual sizes is also absorbed.
    Convolutions have no bias (each is followed by BN, which removes it; the released code keeps one).

    Args:
        in_channels: ``C_in`` of stage ``i``.
        out_channels: ``C_out``, the width of the deepest (pooled) feature.
        in_size: predicted ``H_i`` (square maps).
        out_size: predicted ``H_L``.
    """

    def __init__(self, in_channels: int, out_channels: int, in_size: int, out_size: int) -> None:
        super().__init__()
        mid = max(out_channels // 4, 1)
        self.kernel = max(1, in_size // max(out_size, 1))
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU())
        self.down = nn.Conv2d(mid, mid, self.kernel, stride=self.kernel, bias=False)
        self.down_bn = nn.Sequential(nn.BatchNorm2d(mid), nn.ReLU())
        self.expand = nn.Sequential(
            nn.Conv2d(mid, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()
        )

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``x``: ``(B, C_in, H_i, W_i)``; ``size``: ``(H_L, W_L)``. Returns ``(B, C_out, H_L, W_L)``."""
        y = self.down(self.reduce(x))
        if tuple(y.shape[-2:]) != tuple(size):
            y = F.adaptive_avg_pool2d(y, size)
        return self.expand(self.down_bn(y))


def build_branches(net: nn.Module, image_size: int, num_classes: int) -> tuple[nn.ModuleList, nn.ModuleList]:
    """One :class:`BottleneckBranch` and one ``Linear(num_features, num_classes)`` per non-final stage."""
    sizes = stage_sizes(net.stage_info, image_size)
    width = net.num_features
    bodies = nn.ModuleList(
        BottleneckBranch(s.channels, width, sizes[i], sizes[-1]) for i, s in enumerate(net.stage_info[:-1])
    )
    heads = nn.ModuleList(nn.Linear(width, num_classes) for _ in net.stage_info[:-1])
    init_weights(bodies)
    return bodies, heads


def gap(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling ``(B, C, H, W) -> (B, C)``."""
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def deepest_map(head: nn.Module, last: torch.Tensor) -> torch.Tensor:
    """The map the backbone's head pools, from the last stage map as ``forward_stages`` offers it: the map
    itself when the head's ``pre`` is the exposed final BN-ReLU (WRN: already applied), else ``head.pre``
    (identity, or MobileNetV2's 1x1 conv to 1280 channels)."""
    return last if getattr(head, "pre_activates", False) else head.pre(last)


def head_logits(head: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """The rest of the head after pooling: ``fc(dropout(pooled))``, so that ``head_logits(head,
    gap(deepest_map(head, m))) == forward_head(m)`` without running ``pre`` twice."""
    return head.fc(head.dropout(pooled))


@dataclass
class BYOTOptions:
    """Options of ``byot`` (Zhang et al. 2019; defaults from METHODS.md section 0)."""

    alpha: float = 0.1  #: weight of the soft-label terms; CE terms get ``1 - alpha``
    feature_weight: float = 1e-6  #: lambda, weight of the pooled-feature L2 terms
    #: weight of the deepest classifier's CE; ``None`` = ``1 - alpha`` (paper, Eq. 1); 1 = the authors' release
    deep_ce_weight: float | None = None
    #: multiply the soft-label terms by ``T^2`` (third-party re-implementation; not in the paper)
    t_squared: bool = False
    #: ablation (ours, not in the paper): branches read detached stage maps, so no branch loss reaches the
    #: backbone, which then learns from its own CE only; isolates what the branches do to the backbone
    detach_branches: bool = False
    temperature: float = 3.0  #: softmax temperature of the soft-label terms
    logit_std: bool = False  #: z-score the logits before the KL softmax (Sun et al. 2024)

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (CE terms are weighted 1 - alpha), got {self.alpha}")
        if self.feature_weight < 0:
            raise ValueError(f"feature_weight must not be negative, got {self.feature_weight}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.deep_ce_weight is not None and not 0.0 < self.deep_ce_weight <= 1.0:
            raise ValueError("deep_ce_weight must be in (0, 1] (the deepest classifier needs its labels), "
                             f"or unset for the paper's 1 - alpha; got {self.deep_ce_weight}")


@dataclass
class BYOTOutputs:
    """One forward pass of :class:`BYOT`.

    Attributes:
        branch_logits: ``[(B, K)]``, one per branch, shallow to deep.
        branch_features: ``[(B, D)]``, the pooled vectors entering each branch FC.
        deep_logits: ``(B, K)``, the backbone's own logits.
        deep_features: ``(B, D)``, the pooled vector entering the backbone's FC.
    """

    branch_logits: list[torch.Tensor]
    branch_features: list[torch.Tensor]
    deep_logits: torch.Tensor
    deep_features: torch.Tensor


class BranchedSelfMethod(NetDeployment, Method):
    """The layout shared by ``byot`` and ``fmfsd``: the backbone ``self.net`` (deployed alone) plus a
    bottleneck branch with its own classifier after every non-final stage.

    Subclasses define ``forward_all(images)``, whose result has ``branch_logits`` and ``deep_logits``, and
    ``losses(out, labels)``; they may add heads in ``heads(out)``.
    """

    family = "self"

    def __init__(self, ctx: MethodContext, options=None) -> None:
        super().__init__(ctx, options)
        self.net = ctx.create()
        check_self_backbone(self.net, self.name)
        self.branches, self.branch_fcs = build_branches(self.net, ctx.image_size, ctx.num_classes)

    @property
    def branch_names(self) -> list[str]:
        return [f"branch{i + 1}" for i in range(len(self.branches))]

    def heads(self, out) -> dict[str, torch.Tensor]:
        """Every head's logits from one ``forward_all`` result: ``branch1..``, then ``net``."""
        heads = dict(zip(self.branch_names, out.branch_logits))
        heads["net"] = out.deep_logits
        return heads

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        return self.losses(self.forward_all(images), labels)

    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.forward_all(images))


@register_method("byot", "Be Your Own Teacher: a classifier branch after each stage, the deepest head teaches")
class BYOT(BranchedSelfMethod):
    """Be Your Own Teacher (Zhang et al., ICCV 2019); see the module docstring for the loss."""
    rebuilds_head = True  #: the branch logits and features reuse the head's parts (``head_logits``)
    recipe_epochs = 200  #: CIFAR-100, as the re-implementation with these alpha/lambda (authors' release: 250)

    Options = BYOTOptions

    def forward_all(self, images: torch.Tensor) -> BYOTOutputs:
        """Backbone stages once, then every branch and the deepest head on ``images`` ``(B, C, H, W)``."""
        maps = self.net.forward_stages(images)
        deep_features = gap(deepest_map(self.net.head, maps[-1]))
        size = tuple(maps[-1].shape[-2:])
        inputs = [m.detach() for m in maps[:-1]] if self.options.detach_branches else maps[:-1]
        branch_features = [gap(body(m, size)) for body, m in zip(self.branches, inputs)]
        return BYOTOutputs(
            branch_logits=[fc(f) for fc, f in zip(self.branch_fcs, branch_features)],
            branch_features=branch_features,
            deep_logits=head_logits(self.net.head, deep_features),
            deep_features=deep_features,
        )

    def losses(self, out: BYOTOutputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted loss terms of Zhang et al. (2019), Eq. 1 (with the spec's alpha and lambda).

        * ``loss_ce_net = (1 - alpha) CE(z_L)`` (``deep_ce_weight`` overrides ``1 - alpha``);
          ``loss_ce_branches = (1 - alpha) sum_i CE(z_i)``;
        * ``loss_kd = alpha * sum_i KL(softmax(z_L/T) || softmax(z_i/T))``, batch mean, teacher detached
          (``t_squared``: times ``T^2``);
        * ``loss_feat = lambda * sum_i mean_b ||f_i - f_L.detach()||^2`` (squared L2 over the feature,
          mean over the batch).
        """
        o = self.options
        deep = out.deep_logits.float()
        ce_branches = sum(F.cross_entropy(z.float(), labels) for z in out.branch_logits)
        t2 = 1.0 if o.t_squared else o.temperature ** 2  # kl_div carries T^2; the paper's KL does not
        kd = sum(kl_div(z, deep, o.temperature, o.logit_std) for z in out.branch_logits) / t2
        target = out.deep_features.detach().float()
        feat = sum((f.float() - target).pow(2).sum(dim=1).mean() for f in out.branch_features)
        return {
            "loss_ce_net": (1.0 - o.alpha if o.deep_ce_weight is None else o.deep_ce_weight)
            * F.cross_entropy(deep, labels),
            "loss_ce_branches": (1.0 - o.alpha) * ce_branches,
            "loss_kd": o.alpha * kd,
            "loss_feat": o.feature_weight * feat,
        }


