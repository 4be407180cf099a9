"""``mfkd``: knowledge distillation from fused multi-layer teacher features (METHODS.md section 4).

Tan et al., "Knowledge distillation based on multi-layer fusion features", PLOS ONE 2023. The idea is
the paper's: the feature maps of a pre-trained teacher's front, middle and deep layers are fused into one
map that carries more information than any single layer, and the student learns from that fused map.
**The layout below is our reading of the paper** (its full text was not available to us; every choice
marked [design] in METHODS.md is ours):

1. *Taps*: the outputs of teacher stages ``taps`` (default: first, middle ``n // 2`` and last), by index so
   that any backbone works (3-stage ResNets/WRNs, 4-stage VGG/ResNet-18/MobileNetV2).
2. *Alignment* to the deepest tap ``(c, H, W)``: spatially by adaptive average pooling (``align="pool"``)
   or by a chain of strided 3x3 conv-BN-ReLU (``align="conv"``, one per halving); channels by a 1x1
   conv-BN. Every tap, the deepest included, gets its own 1x1 conv-BN, so that all fused inputs are on the
   same BN-normalised scale.
3. *Fusion*: ``concat -> 1x1 conv -> BN -> ReLU`` (``fusion="concat"``), or the fast-normalised weighted sum
   of FRSKD/BiFPN ``ReLU(sum_i w_i a_i)``, ``w = ReLU(p) / (sum ReLU(p) + 1e-6)`` (``fusion="weighted"``).
4. *Fusion stage* (the first ``fusion_epochs``, default 10 % of the run, at least 1): the fusion module and
   its own GAP -> FC head learn with ``CE(z_fused, y)`` on the frozen teacher's maps. Then the module is
   frozen (no gradients, eval mode): the student never shapes its own target.
5. *Student*: ``L = gamma * CE(z_s, y) + alpha * T^2 * KL(z_t -> z_s) + beta * mean((conn(F_s) - fused)^2)``
   with ``conn`` a 1x1 conv-BN on the student's last map (resized to the fused map's size when they
   differ), T = 4, gamma = alpha = 1, beta = 50; ``kd_weight=0`` gives the feature-only variant.
   During the fusion stage the student trains with ``gamma * CE + alpha * KL`` (no feature term, its target
   is not ready), so it gets as many epochs as the baseline (``fusion_stage_student="ce_kd"``, our choice);
   ``"ce"`` drops the KD term there and ``"wait"`` leaves the student untouched until the fusion stage ends.

Heads: ``net`` (the student) always; ``fused`` (the fusion head) and ``teacher`` while the fusion module
trains and at the first evaluation after it is final (the flag lives in a buffer, so it is checkpointed).
Deploy: the bare student.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models import StageInfo
from ._offline import (
    Connector,
    OfflineMethod,
    check_classifier_trained,
    check_temperature,
    check_weights,
    match_size,
    set_trainable,
)
from .base import MethodContext, register_method
from .losses import feature_mse, kl_div

ALIGN_MODES = ("pool", "conv")
FUSION_MODES = ("concat", "weighted")
FUSION_STAGE_STUDENT = ("ce_kd", "ce", "wait")


@dataclass
class MFKDOptions:
    """Options of ``mfkd`` (the Greek letters of METHODS.md section 4 in brackets).

    Attributes:
        ce_weight: ``gamma``, weight of the student's cross-entropy.
        kd_weight: ``alpha``, weight of ``T^2 * KL(teacher -> student)``; 0 = feature-only variant.
        feat_weight: ``beta``, weight of the fused-feature MSE (worth a sweep over 1, 10, 50, 100).
        temperature: ``T`` of the KD term.
        taps: teacher stage indices to fuse (negative from the end); ``None`` = first, middle, last.
        align: spatial alignment of the shallower taps, ``"pool"`` or ``"conv"``.
        fusion: ``"concat"`` (concat -> 1x1 conv -> BN -> ReLU) or ``"weighted"`` (fast-normalised sum).
        fusion_epochs: length of the fusion stage; ``None`` = 10 % of the run, at least 1.
        fusion_stage_student: what the student does during the fusion stage: ``"ce_kd"``, ``"ce"``, ``"wait"``.
        logit_std: logit standardization of the KD term (Sun et al., CVPR 2024).
    """

    ce_weight: float = 1.0
    kd_weight: float = 1.0
    feat_weight: float = 50.0
    temperature: float = 4.0
    taps: list[int] | None = None
    align: str = "pool"
    fusion: str = "concat"
    fusion_epochs: int | None = None
    fusion_stage_student: str = "ce_kd"
    logit_std: bool = False

    def validate(self) -> None:
        check_weights(ce_weight=self.ce_weight, kd_weight=self.kd_weight, feat_weight=self.feat_weight)
        check_classifier_trained(self.ce_weight, self.kd_weight)
        check_temperature(self.temperature)
        for key, value, accepted in (("align", self.align, ALIGN_MODES), ("fusion", self.fusion, FUSION_MODES),
                                     ("fusion_stage_student", self.fusion_stage_student, FUSION_STAGE_STUDENT)):
            if value not in accepted:
                raise ValueError(f"{key}={value!r} is not accepted; choose one of: {', '.join(accepted)}")
        if self.taps is not None and len(self.taps) == 0:
            raise ValueError("taps must name at least one teacher stage (or be left out: first, middle, last)")
        if self.fusion_epochs is not None and self.fusion_epochs < 1:
            raise ValueError(f"fusion_epochs must be >= 1, got {self.fusion_epochs}")


def resolve_taps(taps: list[int] | None, num_stages: int) -> list[int]:
    """Teacher stage indices, sorted: ``None`` -> ``[0, n // 2, n - 1]`` (distinct); negatives from the end."""
    if taps is None:
        return sorted({0, num_stages // 2, num_stages - 1})
    bad = [t for t in taps if not -num_stages <= t < num_stages]
    if bad:
        raise ValueError(f"taps {bad} do not exist: the teacher has {num_stages} stages "
                         f"(indices 0..{num_stages - 1}, or negative from the end)")
    resolved = sorted(t % num_stages for t in taps)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"taps {taps} name a teacher stage twice")
    return resolved


class TapAligner(nn.Module):
    """Align one teacher tap ``(B, c_i, H_i, W_i)`` to the deepest tap's ``(B, c, H, W)``.

    ``mode="pool"``: adaptive average pooling to ``(H, W)``; ``mode="conv"``: ``round(log2(s / s_i))``
    stride-2 3x3 conv-BN-ReLU blocks (``s`` strides relative to the input), then adaptive pooling only if an
    odd size is still off. Then a 1x1 conv (no bias) -> BN to ``c`` channels. [design, METHODS.md 4]
    """

    def __init__(self, in_channels: int, out_channels: int, in_stride: int, out_stride: int, mode: str) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        if mode == "conv" and out_stride > in_stride:
            for _ in range(max(1, round(math.log2(out_stride / in_stride)))):
                blocks += [nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, bias=False),
                           nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True)]
        self.down = nn.Sequential(*blocks)
        self.project = Connector(in_channels, out_channels)

    def forward(self, tap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = self.down(tap)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.adaptive_avg_pool2d(x, size)
        return self.project(x)


def fast_normalized_weights(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``w = ReLU(p) / (sum ReLU(p) + eps)``: BiFPN's "fast normalised fusion" (Tan et al., EfficientDet,
    CVPR 2020), as used by FRSKD. ``(k,) -> (k,)``, non-negative, summing to ~1."""
    r = F.relu(p)
    return r / (r.sum() + eps)


class MultiLayerFusion(nn.Module):
    """Fuse teacher taps into one map of the deepest tap's shape and classify it (MFKD, Tan et al. 2023;
    layout: our reading, METHODS.md section 4).

    ``forward(taps) -> fused (B, c, H, W)`` (non-negative: ReLU output); ``classify(fused) -> (B, K)`` via
    GAP -> FC.

    Args:
        taps: stage metadata of the tapped teacher stages (channels, strides), shallow to deep.
        num_classes: logits of the fusion head.
        align: ``"pool"`` or ``"conv"`` (see :class:`TapAligner`).
        fusion: ``"concat"`` (concat -> 1x1 conv -> BN -> ReLU) or ``"weighted"`` (``ReLU(sum_i w_i a_i)``
            with fast-normalised learnable ``w``, initialised equal).
    """

    def __init__(self, taps: list[StageInfo], num_classes: int, align: str = "pool", fusion: str = "concat") -> None:
        super().__init__()
        self.deepest = max(range(len(taps)), key=lambda i: (taps[i].stride, i))
        deep = taps[self.deepest]
        self.channels = deep.channels
        self.aligners = nn.ModuleList(
            TapAligner(t.channels, deep.channels, t.stride, deep.stride, align) for t in taps
        )
        self.mode = fusion
        if fusion == "concat":
            conv = nn.Conv2d(len(taps) * deep.channels, deep.channels, kernel_size=1, bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            self.fuse: nn.Module = nn.Sequential(conv, nn.BatchNorm2d(deep.channels), nn.ReLU(inplace=True))
        else:
            self.fuse = nn.ReLU()
            self.fusion_weights = nn.Parameter(torch.ones(len(taps)))
        self.fc = nn.Linear(deep.channels, num_classes)

    def forward(self, taps: list[torch.Tensor]) -> torch.Tensor:
        """``taps``: maps ``(B, c_i, H_i, W_i)`` in the order given at construction -> ``(B, c, H, W)``."""
        size = (int(taps[self.deepest].shape[-2]), int(taps[self.deepest].shape[-1]))
        aligned = [aligner(t, size) for aligner, t in zip(self.aligners, taps)]
        if self.mode == "concat":
            return self.fuse(torch.cat(aligned, dim=1))
        w = fast_normalized_weights(self.fusion_weights)
        return self.fuse(sum(wi * a for wi, a in zip(w, aligned)))

    def classify(self, fused: torch.Tensor) -> torch.Tensor:
        """``(B, c, H, W) -> (B, num_classes)``: global average pooling -> FC."""
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(fused, 1), 1))


#: FitNets' hint loss / MFKD's feature loss: MSE to the detached target (see ``losses.feature_mse``)
feature_loss = feature_mse


@register_method("mfkd", "multi-layer fusion KD: fused teacher stage maps (front/middle/deep) teach the student")
class MFKD(OfflineMethod):
    """MFKD: a fusion module (trained first, then frozen) turns the teacher's stage maps into the target."""
    recipe_epochs = None  #: its defaults are our design (the paper's text was not available): no recipe

    Options = MFKDOptions

    def __init__(self, ctx: MethodContext, options: MFKDOptions | None = None) -> None:
        super().__init__(ctx, options)
        opts = self.options
        t_info = self.teacher.stage_info
        self.taps = resolve_taps(opts.taps, len(t_info))
        self.fusion = MultiLayerFusion([t_info[i] for i in self.taps], ctx.num_classes, opts.align, opts.fusion)
        # built only when used: every trainable parameter must take part in the loss (DDP)
        self.connector = (Connector(self.net.stage_info[-1].channels, self.fusion.channels)
                          if opts.feat_weight > 0 else None)
        fusion_epochs = opts.fusion_epochs if opts.fusion_epochs is not None else max(1, round(0.1 * ctx.epochs))
        if fusion_epochs >= ctx.epochs:
            raise ValueError(
                f"mfkd trains its fusion module for {fusion_epochs} epoch(s) before the student learns "
                f"from it, so it needs more than that: epochs={ctx.epochs}. Raise epochs or lower "
                "options.fusion_epochs"
            )
        # a buffer, so that a resumed run whose `epochs` was extended keeps the stage length it started with
        self.register_buffer("fusion_stage_epochs", torch.tensor(fusion_epochs, dtype=torch.long))
        # the epoch in progress (set by on_epoch_start) and whether the final fusion head was reported
        self.register_buffer("epoch_in_progress", torch.zeros((), dtype=torch.long))
        self.register_buffer("fusion_reported", torch.zeros((), dtype=torch.bool))
        self.register_buffer("fused_val_accuracy", torch.full((), float("nan")))
        self.register_buffer("teacher_val_accuracy", torch.full((), float("nan")))
        # host-side copies of the two flags read at every step (no device sync per batch)
        self._fusion_epochs = fusion_epochs
        self._report_fusion = True
        self.register_load_state_dict_post_hook(self._sync_flags)

    def _sync_flags(self, module: nn.Module, incompatible_keys: Any) -> None:
        """After ``load_state_dict`` (resume, evaluation), refresh the host copies of the buffers."""
        self._fusion_epochs = int(self.fusion_stage_epochs)
        self._report_fusion = not bool(self.fusion_reported)

    # ----------------------------------------------------------------- stages
    @property
    def fusion_epochs(self) -> int:
        """Length of the fusion stage in epochs."""
        return self._fusion_epochs

    def in_fusion_stage(self, epoch: int) -> bool:
        return epoch < self.fusion_epochs

    def on_epoch_start(self, epoch: int) -> None:
        """Switch what trains for this epoch's stage (also re-applied after a resume).

        Fusion stage: the fusion module; the student unless ``fusion_stage_student="wait"``; not the
        connector (its target does not exist yet). Student stage: the fusion module is frozen for good
        (gradients cleared, eval mode); the student and the connector train. Every parameter that requires
        gradients is used by the step's loss, so DDP needs no ``find_unused_parameters``.
        """
        self.epoch_in_progress.fill_(epoch)
        fusion_stage = self.in_fusion_stage(epoch)
        if not fusion_stage and self.fusion.fc.weight.requires_grad:
            set_trainable(self.fusion, False)  # so that no optimizer (nor a zero_grad to zeros) touches it again
            self.freeze(self.fusion)
        if self.connector is not None:
            set_trainable(self.connector, not fusion_stage)
        if self.options.fusion_stage_student == "wait":
            set_trainable(self.net, not fusion_stage)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Every part that trains at some stage (student, connector, fusion module), whether or not it is
        switched on right now: the optimizer is built once, and a part without gradients is skipped."""
        params = [p for name, p in self.named_parameters() if not name.startswith("teacher.")]
        return [{"params": params, "weight_decay": weight_decay, "name": "all"}]

    def on_validation(self, val_accuracy: dict[str, float]) -> None:
        if not self._report_fusion:
            return
        for head, buf in (("fused", self.fused_val_accuracy), ("teacher", self.teacher_val_accuracy)):
            if head in val_accuracy:
                buf.fill_(val_accuracy[head])
        if int(self.epoch_in_progress) >= self.fusion_epochs - 1:
            self.fusion_reported.fill_(True)
            self._report_fusion = False

    # ----------------------------------------------------------------- training
    def training_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        opts = self.options
        t_maps, t_logits = self.teacher_forward(images)
        taps = [t_maps[i] for i in self.taps]
        zero = torch.zeros((), device=images.device)
        terms: dict[str, torch.Tensor] = {}
        if self.in_fusion_stage(epoch):
            fused_logits = self.fusion.classify(self.fusion(taps))
            terms["loss_fusion_ce"] = F.cross_entropy(fused_logits.float(), labels)
            if opts.fusion_stage_student == "wait":
                terms.update({"loss_ce": zero, "loss_feat": zero})
                if opts.kd_weight > 0:
                    terms["loss_kd"] = zero
                return terms
            s_logits = self.net(images)
            fused = None
        else:
            terms["loss_fusion_ce"] = zero
            with torch.no_grad():
                fused = self.fusion(taps)
            s_maps, s_logits = self.student_forward(images)
        terms["loss_ce"] = opts.ce_weight * F.cross_entropy(s_logits.float(), labels)
        if opts.kd_weight > 0:
            use_kd = fused is not None or opts.fusion_stage_student == "ce_kd"
            terms["loss_kd"] = (opts.kd_weight * kl_div(s_logits, t_logits, opts.temperature, opts.logit_std)
                                if use_kd else zero)
        if fused is not None and self.connector is not None:
            student = match_size(self.connector(s_maps[-1]), fused.shape[-2:])
            terms["loss_feat"] = opts.feat_weight * feature_loss(student, fused)
        else:
            terms["loss_feat"] = zero
        return terms

    # ----------------------------------------------------------------- evaluation
    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        heads = {"net": self.net(images)}
        if self._report_fusion:
            t_maps, t_logits = self.teacher_forward(images)
            heads["fused"] = self.fusion.classify(self.fusion([t_maps[i] for i in self.taps]))
            heads["teacher"] = t_logits
        return heads

    def summary_extras(self) -> dict[str, Any]:
        def acc(buf: torch.Tensor) -> float | None:
            v = float(buf)
            return None if math.isnan(v) else v

        return {
            **super().summary_extras(),
            "taps": list(self.taps),
            "fusion_epochs": self.fusion_epochs,
            "fused_head_val_accuracy": acc(self.fused_val_accuracy),
            "teacher_val_accuracy": acc(self.teacher_val_accuracy),
        }
