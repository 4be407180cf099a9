"""What the offline methods (``kd``, ``fitnet``, ``at``, ``mfkd``) share: the frozen teacher and the student.

An offline method distils from a **pre-trained teacher** that the engine loads from ``--teacher``
(a ``best.pt`` of a ``baseline`` run, or a deploy file from ``fusionkd export``), checks against the run's
data and hands over as ``ctx.teacher``. :class:`OfflineMethod` registers that network as the submodule
``teacher`` (so its weights travel in the checkpoint and a resumed run does not need the teacher file),
freezes it (no gradients, always in eval mode: its BatchNorm statistics never change), and builds the
student ``net``, the one head these methods train and deploy.

This module starts with ``_``, so the methods package does not import it as a method.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models import stage_maps
from .base import EnsembleTeacher, Method, MethodContext, NetDeployment
from .losses import linear_rampup


class OfflineMethod(NetDeployment, Method):
    """Base of the methods that learn from a frozen, pre-trained teacher.

    Submodules:
        net: the student (zoo model ``ctx.model``); head ``"net"``; the deployed network.
        teacher: the frozen teacher (``ctx.teacher.model``), in eval mode forever.
    """

    family = "offline"
    needs_teacher = True
    #: whether the method reads the teacher's stage maps (or features); ``False``: its logits only, so several
    #: teachers (``teachers=[...]``, an :class:`EnsembleTeacher`) can teach it
    reads_teacher_maps = True

    def __init__(self, ctx: MethodContext, options: Any = None) -> None:
        super().__init__(ctx, options)
        if ctx.teacher is None:
            raise ValueError(
                f"method {self.name!r} distils from a pre-trained teacher, but none was given: pass "
                "--teacher CHECKPOINT (a best.pt from `fusionkd train --method baseline ...` on the same data)"
            )
        self.net = ctx.create()
        teacher = ctx.teacher.model
        if isinstance(teacher, EnsembleTeacher) and self.reads_teacher_maps:
            raise ValueError(f"method {self.name!r} reads the teacher's stage maps; several teachers give only "
                             "their averaged logits (teachers=[...] goes with kd, dkd and dist)")
        t_classes = getattr(teacher, "num_classes", ctx.num_classes)
        t_chans = getattr(teacher, "in_chans", ctx.in_chans)
        if t_classes != ctx.num_classes or t_chans != ctx.in_chans:
            raise ValueError(
                f"the teacher {ctx.teacher.model_name!r} predicts {t_classes} classes from {t_chans}-channel "
                f"images, but this run has {ctx.num_classes} classes and {ctx.in_chans} channels; "
                "train the teacher on the same dataset"
            )
        self.teacher = self.freeze(teacher)

    # ----------------------------------------------------------------- teacher
    @torch.no_grad()
    def teacher_forward(self, images: torch.Tensor, raw: bool = False
                        ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The frozen teacher's stage maps ``[(B, C_i, H_i, W_i)]`` (``raw=True``: the raw stage outputs,
        see :func:`fusionkd.models.stage_maps`) and logits ``(B, K)``.

        ``no_grad`` rather than ``inference_mode``: inference tensors cannot be saved for the backward
        pass of the losses that use them. It runs in the caller's autocast precision.
        """
        return _maps_and_logits(self.teacher, images, raw)

    def student_forward(self, images: torch.Tensor, raw: bool = False
                        ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The student's stage maps ``[(B, C_i, H_i, W_i)]`` (``raw`` as for the teacher) and logits."""
        return _maps_and_logits(self.net, images, raw)

    # ----------------------------------------------------------------- contract
    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"net": self.net(images)}


    def summary_extras(self) -> dict[str, Any]:
        t = self.ctx.teacher
        meta = t.meta if t is not None else {}
        return {
            "teacher": {
                "model": t.model_name if t is not None else None,
                "path": meta.get("path"),
                "recorded_test_accuracy": meta.get("test_accuracy"),
                "source": meta.get("source", "teacher"),
                "weights": meta.get("weights"),
                "check": meta.get("check"),
                "parameters": sum(p.numel() for p in self.teacher.parameters()),
            }
        }


def stage_index(index: int | None, num_stages: int, who: str) -> int:
    """Resolve a stage index (negative counts from the end; ``None`` = the middle stage ``n // 2``)."""
    if index is None:
        return num_stages // 2
    if not -num_stages <= index < num_stages:
        raise ValueError(f"{who} stage {index} does not exist: the network has {num_stages} stages "
                         f"(indices 0..{num_stages - 1}, or -1 for the last)")
    return index % num_stages


def match_size(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Resize ``(B, C, H, W)`` to ``size = (H', W')``: adaptive average pooling when shrinking, bilinear
    interpolation when enlarging, unchanged when the size already matches (explicit sizes, so odd maps
    such as 7x7 -> 4x4 work)."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class Connector(nn.Sequential):
    """``1x1 conv (no bias) -> BN``: maps a student map ``(B, c_s, H, W)`` to ``(B, c_t, H, W)``.

    The regressor of FitNets (Romero et al., ICLR 2015) and the student connector of MFKD. No final ReLU
    (RepDistiller's ``ConvReg`` has one): pre-activation teachers (WRN) give maps with negative values.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        super().__init__(conv, nn.BatchNorm2d(out_channels))


def check_finite(options: Any, *keys: str) -> None:
    """Raise ValueError naming the first of ``options``' fields ``keys`` that is NaN or infinite."""
    for key in keys:
        value = getattr(options, key)
        if not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value}")


def check_weights(**weights: float) -> None:
    """Raise ValueError when a loss weight is negative or every weight is zero."""
    for key, value in weights.items():
        if value < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")
    if all(v == 0 for v in weights.values()):
        raise ValueError(f"at least one of {', '.join(weights)} must be positive (nothing would be trained)")


def check_classifier_trained(ce_weight: float, kd_weight: float) -> None:
    """Raise ValueError when neither CE nor KD would train the student's classifier (the deployed head)."""
    if ce_weight == 0 and kd_weight == 0:
        raise ValueError("ce_weight and kd_weight are both 0: nothing would train the student's classifier; "
                         "set one of them > 0")


def set_trainable(module: nn.Module, trainable: bool) -> None:
    """Switch a module's parameters on or off for training (gradients cleared when off).

    Used at stage switches so that every trainable parameter takes part in each step's loss, as
    ``DistributedDataParallel`` without ``find_unused_parameters`` requires.
    """
    for p in module.parameters():
        p.requires_grad_(trainable)
        if not trainable:
            p.grad = None


def check_warmup(warmup_epochs: int) -> None:
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0 (0 = no warm-up), got {warmup_epochs}")


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """The factor of a warmed-up loss term at fusionkd's 0-based ``epoch``: ``min((epoch + 1) / W, 1)``,
    i.e. mdistiller's ``min(epoch / W, 1)`` with its 1-based epoch (DKD, ReviewKD); 1 when ``W = 0``."""
    return linear_rampup(epoch + 1, warmup_epochs)


def check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _maps_and_logits(net: nn.Module, images: torch.Tensor, raw: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One forward of ``net``: its stage maps (the contract's, or the raw outputs) and its logits; an
    :class:`EnsembleTeacher` gives no maps (``[]``) and its mixed logits."""
    if isinstance(net, EnsembleTeacher):
        return [], net(images)
    maps, raw_maps = stage_maps(net, images)
    return (raw_maps if raw else maps), net.forward_head(maps[-1])
