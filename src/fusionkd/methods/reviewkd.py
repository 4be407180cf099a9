"""``reviewkd``: knowledge review from a frozen, pre-trained teacher.

Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021. The student's stage maps are
fused **deep to shallow** by attention-based fusion (ABF) modules, so that each shallow student level is
compared with the teacher together with what the deeper levels carry ("review"); the fused maps are
matched to the teacher's stage maps level by level with the hierarchical context loss (HCL):

    ABF_i: x = BN(conv1x1(F_s,i)) (mid channels); for all but the deepest level, r = nearest-upsample of the
           residual of level i+1, (a, b) = sigmoid(conv1x1([x, r])), x = a * x + b * r; then x is the
           residual handed to level i-1, and out_i = BN(conv3x3(x)) with the teacher's channels
    HCL(f, t) = [ MSE(f, t) + sum_j w_j * MSE(pool_{l_j}(f), pool_{l_j}(t)) ] / (1 + sum_j w_j),
           l_j running over the pooled sizes 4, 2, 1 smaller than the map (adaptive average pooling),
           w = 1/2, 1/4, 1/8 over the sizes used
    L = ce_weight * CE(z_s, y) + min((epoch + 1) / warmup_epochs, 1) * review_weight * sum_i HCL(out_i, F_t,i)

with the teacher detached. The formulas and defaults follow the authors' setting as packaged in mdistiller
(``mdistiller/distillers/ReviewKD.py``, ``mdistiller/engine/cfg.py``: ``CE_WEIGHT 1.0, REVIEWKD_WEIGHT 1.0,
WARMUP_EPOCHS 20``, mid channels ``min(512, C)`` of the deepest student level). mdistiller's epoch counts
from 1, fusionkd's from 0, hence ``epoch + 1``.

Levels: the last ``k = min(n_s, n_t)`` stage maps of each network (fusionkd's stage-map rule, one per
stage), deepest paired with deepest, plus (``pooled_level=True``, as in mdistiller) a 1x1 level: the global
average of each network's last stage map, i.e. the feature its classifier reads. When a fused student map
and its teacher map differ in size, the fused map is resized to the teacher's size before the 3x3 conv
(adaptive average pooling down, bilinear up; mdistiller resizes with nearest interpolation to sizes given
in its config). Heads: ``net`` (the student). Deploy: the student.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._offline import OfflineMethod, check_warmup, check_weights, match_size, warmup_factor
from .base import MethodContext, register_method

#: HCL's pooled sizes, in the order that halves their weight (mdistiller's ``[4, 2, 1]``)
HCL_SIZES = (4, 2, 1)


@dataclass
class ReviewKDOptions:
    """Options of ``reviewkd``.

    Attributes:
        ce_weight: weight of the cross-entropy with the labels (> 0: it alone trains the classifier).
        review_weight: weight of the summed HCL between the fused student maps and the teacher's maps
            (mdistiller's ``REVIEWKD_WEIGHT``).
        warmup_epochs: length of the linear warm-up of the HCL term (``min((epoch + 1) / warmup_epochs, 1)``;
            0 = none). Not the learning-rate warm-up (the config key ``warmup_epochs``).
        max_mid_channels: cap on the ABF modules' middle width ``min(max_mid_channels, C)``, ``C`` the
            channels of the student's deepest level.
        pooled_level: add the globally pooled last map of each network as the deepest (1x1) level.
    """

    ce_weight: float = 1.0
    review_weight: float = 1.0
    warmup_epochs: int = 20
    max_mid_channels: int = 512
    pooled_level: bool = True

    def validate(self) -> None:
        check_weights(ce_weight=self.ce_weight, review_weight=self.review_weight)
        if self.ce_weight == 0:
            raise ValueError("ce_weight must be > 0: the cross-entropy is the only term that trains the "
                             "student's classifier")
        check_warmup(self.warmup_epochs)
        if self.max_mid_channels < 1:
            raise ValueError(f"max_mid_channels must be >= 1, got {self.max_mid_channels}")



def hcl_loss(student: list[torch.Tensor], teacher: list[torch.Tensor],
             sizes: tuple[int, ...] = HCL_SIZES) -> torch.Tensor:
    """The hierarchical context loss, summed over levels; the teacher maps are detached.

    Per level (maps ``(B, C, H, W)`` of equal shape): the MSE at full size plus, for each ``l`` in ``sizes``
    with ``l < H``, the MSE of the ``l x l`` adaptive averages with weight ``1/2, 1/4, ...`` (halved per size
    used), divided by the total weight.
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(f"HCL needs matching, non-empty lists of maps, got {len(student)} and {len(teacher)}")
    total = None
    for fs, ft in zip(student, teacher):
        if fs.shape != ft.shape:
            raise ValueError(f"HCL compares maps of the same shape, got {tuple(fs.shape)} and {tuple(ft.shape)}")
        fs, ft = fs.float(), ft.detach().float()
        loss = F.mse_loss(fs, ft)
        weight, weight_sum = 1.0, 1.0
        for size in sizes:
            if size >= fs.shape[-2]:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
            weight_sum += weight
        total = loss / weight_sum if total is None else total + loss / weight_sum
    return total


class ABF(nn.Module):
    """Attention-based fusion of one student level with the residual from the level below it (deeper).

    ``conv1`` (1x1, BN) to ``mid_channels``; with ``fuse``, the residual is resized to this level's size
    (nearest) and the two maps are mixed by two sigmoid attention maps from a 1x1 conv of their concat;
    ``conv2`` (3x3, BN) gives the teacher's ``out_channels``.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = (nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None)
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                out_size: tuple[int, int] | torch.Size | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, residual)``: ``out`` ``(B, out_channels, *out_size)`` for the loss, ``residual``
        ``(B, mid_channels, *out_size)`` for the next shallower level."""
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("this ABF fuses with a deeper level: pass its residual")
            residual = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")
            att = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * att[:, 0:1] + residual * att[:, 1:2]
        if out_size is not None:
            x = match_size(x, out_size)
        return self.conv2(x), x


def review_fuse(abfs: nn.ModuleList, levels: list[torch.Tensor],
                out_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Run ``abfs[i]`` on ``levels[i]`` (both ordered shallow to deep) from the deepest level up, each fusing
    the residual of the level below; the outputs, shallow to deep, sized ``out_sizes``."""
    outs: list[torch.Tensor] = []
    residual = None
    for abf, level, size in zip(reversed(abfs), reversed(levels), reversed(out_sizes)):
        out, residual = abf(level, residual, size)
        outs.insert(0, out)
    return outs


def review_levels(maps: list[torch.Tensor], k: int, pooled: bool) -> list[torch.Tensor]:
    """The last ``k`` stage maps, plus the global average of the last one as a 1x1 map when ``pooled``."""
    levels = list(maps[-k:])
    if pooled:
        levels.append(F.adaptive_avg_pool2d(maps[-1], 1))
    return levels


@register_method("reviewkd", "Knowledge review: deep-to-shallow ABF fusion of student maps + HCL to teacher maps (+CE)")
class ReviewKD(OfflineMethod):
    """ReviewKD: the student's stage maps, fused deep to shallow, learn the teacher's stage maps."""
    recipe_epochs = 240  #: mdistiller's CIFAR-100 schedule, whose weights and warm-up these defaults are
    recipe_options = ("ce_weight", "review_weight", "warmup_epochs")

    Options = ReviewKDOptions

    def __init__(self, ctx: MethodContext, options: ReviewKDOptions | None = None) -> None:
        super().__init__(ctx, options)
        opts = self.options
        s_info, t_info = self.net.stage_info, self.teacher.stage_info
        self.num_stage_levels = min(len(s_info), len(t_info))
        k = self.num_stage_levels
        in_ch = [i.channels for i in s_info[-k:]]
        out_ch = [i.channels for i in t_info[-k:]]
        if opts.pooled_level:
            in_ch.append(in_ch[-1])
            out_ch.append(out_ch[-1])
        self.mid_channels = min(opts.max_mid_channels, in_ch[-1])
        # built only when used: every trainable parameter must take part in the loss (DDP)
        self.abfs = (nn.ModuleList(ABF(ci, self.mid_channels, co, fuse=i < len(in_ch) - 1)
                                   for i, (ci, co) in enumerate(zip(in_ch, out_ch)))
                     if opts.review_weight > 0 else None)

    def review_terms(self, s_maps: list[torch.Tensor], t_maps: list[torch.Tensor]
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(fused student maps, teacher levels)``, shallow to deep, of equal shapes."""
        k, pooled = self.num_stage_levels, self.options.pooled_level
        t_levels = review_levels(t_maps, k, pooled)
        fused = review_fuse(self.abfs, review_levels(s_maps, k, pooled), [t.shape[-2:] for t in t_levels])
        return fused, t_levels

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        opts = self.options
        t_maps, _ = self.teacher_forward(images)
        s_maps, s_logits = self.student_forward(images)
        terms = {"loss_ce": opts.ce_weight * F.cross_entropy(s_logits.float(), labels)}
        if self.abfs is not None:
            fused, t_levels = self.review_terms(s_maps, t_maps)
            w = warmup_factor(epoch, opts.warmup_epochs)
            terms["loss_review"] = (w * opts.review_weight) * hcl_loss(fused, t_levels)
        return terms

    def summary_extras(self) -> dict:
        return {**super().summary_extras(), "review": {"stage_levels": self.num_stage_levels,
                                                      "pooled_level": self.options.pooled_level,
                                                      "mid_channels": self.mid_channels}}
