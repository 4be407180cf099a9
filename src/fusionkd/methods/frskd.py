"""``frskd``: Feature Refinement via Self-Knowledge Distillation (Ji, Shin, Hwang, Park, Moon, CVPR 2021).

An auxiliary **self-teacher** (a BiFPN adapted to classification, :class:`SelfTeacher`) takes the
classifier's stage maps ``F_1 .. F_n``, aggregates them top-down and bottom-up, and returns refined maps
``T_1 .. T_n`` and its own logits ``z_t``. The classifier learns from both (METHODS.md section 2):

    L = CE(z_c) + CE(z_t) + alpha * KL_T(z_t -> z_c) + beta * sum_i AT(F_i, T_i),   T = 4, alpha = 2, beta = 100.

Gradients: the KD and AT targets (``z_t``, ``T_i``) are detached, so those terms train the classifier
only; the self-teacher learns from its own CE, and the classifier maps that feed it are *not* detached,
so ``CE(z_t)`` also trains the classifier's stages.

Ramp-up (ours, off by default): ``options.rampup_epochs = R > 0`` multiplies the KD and AT terms by
FFL's/ONE's sigmoid ramp ``w(t) = exp(-5 (1 - min(t, R)/R)^2)`` per (0-based) epoch ``t``; the CE terms
keep weight 1. The paper's weights are set for 200 epochs (``recipe_epochs``); docs/methods/self.md
"Short runs" has what was measured for short runs.

Heads: ``net`` (the classifier), ``teacher`` (the self-teacher). Deploy: the classifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..models import is_staged
from .base import Method, MethodContext, NetDeployment, register_method
from .losses import attention_transfer, kl_div, sigmoid_rampup

UPSAMPLE_MODES = ("bilinear", "nearest")
#: what the short-run warning (:func:`fusionkd.methods.base.short_run_warning`) adds; ``{epochs}``: the run's length
SHORT_RUN_ADVICE = (
    "For short runs set options.rampup_epochs={epochs} (the KD/AT weights ramp up over the run; measured on "
    "Fashion-MNIST, 4 epochs of 2,000 images: deployed network 70.7 % against 61.4 % with the defaults and 72.0 % "
    "for plain training) or options.alpha=0.8 options.beta=37 (docs/tune.md, chosen on validation: 71.1 % against "
    "59.5 %); docs/methods/self.md \"Short runs\" has the measurements."
)


class PointwiseBlock(nn.Sequential):
    """``pw(a -> b)``: 1x1 conv (no bias) -> BN -> ReLU, ``(B, a, H, W) -> (B, b, H, W)`` (FRSKD [code])."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()
        )


class SeparableBlock(nn.Sequential):
    """``dws(a -> b, depth)``: ``[dw3x3 -> 1x1 -> BN]`` then ``(depth - 1) x [ReLU -> dw3x3 -> 1x1 -> BN]``.

    FRSKD [code] (``DepthConvBlock``): depthwise 3x3 and pointwise 1x1 without bias, no final ReLU.
    ``(B, a, H, W) -> (B, b, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, depth: int = 2) -> None:
        layers: list[nn.Module] = []
        c = in_channels
        for i in range(depth):
            if i > 0:
                layers.append(nn.ReLU())
            layers += [
                nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
                nn.Conv2d(c, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
            ]
            c = out_channels
        super().__init__(*layers)


def fast_normalized_weights(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """EfficientDet's "fast normalised fusion" weights ``w = ReLU(p) / (sum ReLU(p) + eps)``.

    Tan, Pang, Le, "EfficientDet", CVPR 2020; FRSKD [code]. ``p``: ``(k,)`` -> ``(k,)``, each in ``[0, 1)``.
    """
    w = F.relu(p)
    return w / (w.sum() + eps)


def resize_up(x: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    """``Up``: resize ``(B, C, h, w)`` to ``size = (H, W)`` (x2 on the zoo backbones).

    An explicit target size instead of ``scale_factor=2`` (identical when ``H = 2h``) makes odd maps work,
    e.g. ResNet-18 at 28x28: 4x4 -> 7x7.
    """
    if mode == "bilinear":
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return F.interpolate(x, size=tuple(size), mode="nearest")


def max_pool_same(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``Down``: 3x3 max-pool, stride 2, TensorFlow "same" padding, ``(B, C, H, W) -> (B, C, *size)``.

    As the released code's ``MaxPool2dStaticSamePadding``: ``ceil(H / 2)`` outputs, total padding
    ``2 (ceil(H / 2) - 1) + 3 - H`` split with the extra pixel at the bottom/right, i.e. one pixel on each
    side of an odd side and one pixel after an even side (the windows start at row 0). Both are a PyTorch
    max-pool with ``padding = H mod 2`` and ``ceil_mode=True`` (the last window of an even side hangs one
    pixel past the border), which saves the padded copy; PyTorch pads with ``-inf`` where the released code
    pads zeros, identical on its non-negative (ReLU) inputs.

    If ``ceil(H / 2)`` is not the target ``size`` (not the case on the zoo backbones, whose down-sampling
    rounds up too), an adaptive max-pool makes it so.
    """
    h, w = x.shape[-2:]
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=(h % 2, w % 2), ceil_mode=True)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.adaptive_max_pool2d(x, tuple(size))
    return x


class SelfTeacher(nn.Module):
    """FRSKD's self-teacher: a one-layer BiFPN over the classifier's stage maps (FRSKD [code], ``BiFPNc``).

    For levels ``i = 1..n`` with ``c_i`` channels and width ``d_i = width * c_i``:

    * lateral ``L_i = pw_i(ReLU(F_i))``; second lateral ``L'_i = pw'_i(ReLU(F_i))`` for ``i >= 2``;
    * top-down ``P_n = L_n``, ``P_i = dws_i(a ReLU(L_i) + b pw(Up(ReLU(P_{i+1}))))``;
    * bottom-up ``T_1 = P_1``, ``T_i = dws_i(a ReLU(L'_i) + b ReLU(P_i) + c pw(Down(ReLU(T_{i-1}))))`` for
      ``1 < i < n``, ``T_n = dws_n(a ReLU(L'_n) + c pw(Down(ReLU(T_{n-1}))))``;
    * ``(a, b, c)`` per node: :func:`fast_normalized_weights` of learnable ``p`` (init 1);
    * outputs ``[ReLU(T_i)]`` (``(B, d_i, H_i, W_i)``, the resolution of ``F_i``) and
      ``z_t = FC(GAP(ReLU(T_n)))``.

    Args:
        channels: ``c_1 .. c_n`` of the classifier's stage maps (from ``stage_info``), ``n >= 2``.
        num_classes: logits of the self-teacher's classifier.
        width: ``w``, the channel multiplier ``d_i = w c_i`` (2 in the paper).
        depth: depth of the ``dws`` blocks (2 in the paper).
        upsample: ``"bilinear"`` (the paper) or ``"nearest"`` (the released code).
    """

    def __init__(
        self, channels: Sequence[int], num_classes: int, width: int = 2, depth: int = 2,
        upsample: str = "bilinear",
    ) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"the self-teacher fuses at least two stage maps, got channels {list(channels)}")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        n = len(channels)
        d = [width * c for c in channels]
        self.channels = list(channels)
        self.widths = d
        self.upsample = upsample
        self.lateral = nn.ModuleList(PointwiseBlock(c, di) for c, di in zip(channels, d))
        self.lateral2 = nn.ModuleList(PointwiseBlock(channels[i], d[i]) for i in range(1, n))
        # top-down node i (0-based, i < n-1): fuses L_i with pw(Up(P_{i+1}))
        self.up_proj = nn.ModuleList(PointwiseBlock(d[i + 1], d[i]) for i in range(n - 1))
        self.up_blocks = nn.ModuleList(SeparableBlock(d[i], d[i], depth) for i in range(n - 1))
        self.up_weights = nn.ParameterList(nn.Parameter(torch.ones(2)) for _ in range(n - 1))
        # bottom-up node i (0-based, i >= 1), stored at index i-1: fuses L'_i, [P_i,] pw(Down(T_{i-1}))
        self.down_proj = nn.ModuleList(PointwiseBlock(d[i - 1], d[i]) for i in range(1, n))
        self.down_blocks = nn.ModuleList(SeparableBlock(d[i], d[i], depth) for i in range(1, n))
        self.down_weights = nn.ParameterList(
            nn.Parameter(torch.ones(3 if i < n - 1 else 2)) for i in range(1, n)
        )
        self.fc = nn.Linear(d[-1], num_classes)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``feats``: ``[F_i (B, c_i, H_i, W_i)]`` -> (``[ReLU(T_i) (B, d_i, H_i, W_i)]``, logits ``(B, K)``)."""
        n = len(self.channels)
        if len(feats) != n:
            raise ValueError(f"the self-teacher was built for {n} stage maps, got {len(feats)}")
        # L_i and L'_i end with a ReLU, so the ReLU(L_i), ReLU(L'_i) and ReLU(P_n) of the formulas are no-ops
        act = [F.relu(f) for f in feats]
        lat = [blk(a) for blk, a in zip(self.lateral, act)]
        lat2 = [blk(a) for blk, a in zip(self.lateral2, act[1:])]

        td: list[torch.Tensor] = [lat[-1]]  # P_n, then P_{n-1}, ... prepended
        for i in range(n - 2, -1, -1):
            w = fast_normalized_weights(self.up_weights[i])
            above = td[0] if i == n - 2 else F.relu(td[0])
            up = self.up_proj[i](resize_up(above, feats[i].shape[-2:], self.upsample))
            td.insert(0, self.up_blocks[i](w[0] * lat[i] + w[1] * up))

        out = [td[0]]  # T_1 = P_1
        for i in range(1, n):
            w = fast_normalized_weights(self.down_weights[i - 1])
            down = self.down_proj[i - 1](max_pool_same(F.relu(out[-1]), feats[i].shape[-2:]))
            if i < n - 1:
                fused = w[0] * lat2[i - 1] + w[1] * F.relu(td[i]) + w[2] * down
            else:
                fused = w[0] * lat2[i - 1] + w[1] * down
            out.append(self.down_blocks[i - 1](fused))

        refined = [F.relu(t) for t in out]
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(refined[-1], 1), 1))
        return refined, logits


@dataclass
class FRSKDOptions:
    """Options of ``frskd`` (Ji et al. 2021; CIFAR-100 defaults of the paper, set for its 200 epochs).

    ``rampup_epochs = R > 0`` multiplies the KD and AT terms by ``w(t) = exp(-5 (1 - min(t, R)/R)^2)`` at
    0-based epoch ``t`` (0.0067 at ``t = 0``, 1 from ``t = R`` on; FFL's and ONE's ramp), the same weight for
    every step of an epoch; ``R`` may be fractional and longer than the run. 0 (default): no ramp, the
    paper's loss exactly.
    """

    alpha: float = 2.0  #: weight of the soft-label term KL_T(z_t -> z_c)
    beta: float = 100.0  #: weight of the attention-transfer terms
    temperature: float = 4.0  #: softmax temperature of the soft-label term
    width: int = 2  #: self-teacher width multiplier, d_i = width * c_i
    depth: int = 2  #: depth of the self-teacher's separable blocks
    upsample: str = "bilinear"  #: "bilinear" (the paper) or "nearest" (the released code)
    rampup_epochs: float = 0.0  #: R of a sigmoid ramp-up of the KD and AT weights (0: none, the paper; ours, >= 0)
    logit_std: bool = False  #: z-score the logits before the KL softmax (Sun et al. 2024)

    def validate(self) -> None:
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"alpha and beta must not be negative, got alpha={self.alpha}, beta={self.beta}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.width < 1 or self.depth < 1:
            raise ValueError(f"width and depth must be at least 1, got width={self.width}, depth={self.depth}")
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample={self.upsample!r} is not accepted; choose one of: {', '.join(UPSAMPLE_MODES)}")
        if not self.rampup_epochs >= 0:  # also refuses NaN
            raise ValueError(f"rampup_epochs must be >= 0 (0 = no ramp-up), got {self.rampup_epochs}")


@dataclass
class FRSKDOutputs:
    """One forward pass of :class:`FRSKD`.

    Attributes:
        maps: the classifier's stage maps ``[F_i (B, c_i, H_i, W_i)]``.
        logits: the classifier's logits ``z_c`` ``(B, K)``.
        refined: the self-teacher's maps ``[ReLU(T_i) (B, d_i, H_i, W_i)]``.
        teacher_logits: the self-teacher's logits ``z_t`` ``(B, K)``.
    """

    maps: list[torch.Tensor]
    logits: torch.Tensor
    refined: list[torch.Tensor]
    teacher_logits: torch.Tensor


@register_method("frskd", "FRSKD: a BiFPN self-teacher refines the stage maps and teaches the classifier")
class FRSKD(NetDeployment, Method):
    """Feature Refinement via Self-Knowledge Distillation (Ji et al., CVPR 2021)."""

    family = "self"
    Options = FRSKDOptions
    #: the paper's optimiser: SGD lr 0.1, momentum 0.9, batch 128 (engine defaults) and weight decay 1e-4
    recipe: ClassVar[dict] = {"weight_decay": 1e-4}
    #: alpha = 2, beta = 100 are the paper's CIFAR-100 values for its 200 epochs (x0.1 at 100 and 150)
    recipe_epochs: ClassVar[int | None] = 200
    #: the paper's loss weights and its absence of a ramp-up; setting any of them silences the warning
    recipe_options: ClassVar[tuple[str, ...] | None] = ("alpha", "beta", "rampup_epochs")
    short_run_advice: ClassVar[str] = SHORT_RUN_ADVICE

    def __init__(self, ctx: MethodContext, options: FRSKDOptions | None = None) -> None:
        super().__init__(ctx, options)
        self.net = ctx.create()
        if not is_staged(self.net) or len(self.net.stage_info) < 2:
            raise ValueError(f"frskd needs a network on the stage contract (a zoo backbone, or a module adapted "
                             f"with fusionkd.models.HookBackbone) with at least two stages, got {ctx.model!r}")
        o = self.options
        self.teacher = SelfTeacher(
            [s.channels for s in self.net.stage_info], ctx.num_classes, o.width, o.depth, o.upsample
        )

    def forward_all(self, images: torch.Tensor) -> FRSKDOutputs:
        """Classifier stages and head, then the self-teacher on the (not detached) stage maps."""
        maps = self.net.forward_stages(images)
        refined, teacher_logits = self.teacher(maps)
        return FRSKDOutputs(maps, self.net.forward_head(maps[-1]), refined, teacher_logits)

    def rampup_weight(self, epoch: float) -> float:
        """``w(t)`` of the KD and AT terms at (0-based) ``epoch``: 1 when ``rampup_epochs`` is 0."""
        return sigmoid_rampup(epoch, self.options.rampup_epochs)

    def losses(self, out: FRSKDOutputs, labels: torch.Tensor, weight: float = 1.0) -> dict[str, torch.Tensor]:
        """FRSKD's loss (Ji et al. 2021, Eq. 6), as named terms:

        * ``loss_ce = CE(z_c)``, ``loss_ce_teacher = CE(z_t)``;
        * ``loss_kd = w alpha * T^2 KL(softmax(z_t/T) || softmax(z_c/T))`` (``z_t`` detached);
        * ``loss_at = w beta * sum_i mean((phi(F_i) - phi(T_i.detach()))^2)``,
          ``phi(f) = normalize(mean_c(f^2))`` (Zagoruyko & Komodakis 2017);

        ``w = weight``, the ramp-up (:meth:`rampup_weight`; 1 = the paper's loss).
        """
        o = self.options
        kd = kl_div(out.logits, out.teacher_logits, o.temperature, o.logit_std)
        at = sum(attention_transfer(f, t) for f, t in zip(out.maps, out.refined))
        if weight != 1.0:  # weight 1: exactly the paper's expression, bit for bit
            kd, at = weight * kd, weight * at
        return {
            "loss_ce": F.cross_entropy(out.logits.float(), labels),
            "loss_ce_teacher": F.cross_entropy(out.teacher_logits.float(), labels),
            "loss_kd": o.alpha * kd,
            "loss_at": o.beta * at,
        }

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        return self.losses(self.forward_all(images), labels, self.rampup_weight(epoch))

    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.forward_all(images)
        return {"net": out.logits, "teacher": out.teacher_logits}

