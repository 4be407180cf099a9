"""``at``: activation-based attention transfer from a frozen, pre-trained teacher (METHODS.md section 0).

Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of Convolutional
Neural Networks via Attention Transfer", ICLR 2017. The student matches the teacher's spatial attention
maps ``phi(F) = normalize(mean_c(F^2).flatten())`` at several stages:

    L = gamma * CE(z_s, y) + beta / 2 * sum_{(i, j)} mean((phi(F_s_i) - phi(F_t_j))^2)  [+ alpha * KL_T]

with beta = 1000 and gamma = 1, exactly the authors' code (``opt.beta / 2 * sum(at_losses)``, the mean
over batch and positions). RepDistiller uses ``beta * sum`` with beta = 1000, i.e. twice this weight: pass
``at_weight=2000`` for parity with its tables.

Which maps (``layout``): RepDistiller and mdistiller attend to ``feat[1:-1]`` / ``feats[1:]``, every
spatial feature but ``f0`` (the stem's output; on VGG block 0's). On the CIFAR ResNets, ResNet-18/50 and
MobileNetV2 those are exactly our stage maps; on a WRN they are the raw group sums, i.e. ``maps=raw`` (see
below). On VGG they are ``f1, f2, f3, f4`` (the outputs of blocks 1-4), while our four VGG stages end at
``f0, f1, f2, f4`` (blocks 3 and 4 share a resolution and form one stage, see :mod:`fusionkd.models.vgg`).
``layout=peers`` (default) therefore attends on a VGG to ``f1, f2, f3, f4``: ``f3`` is read inside stage 3,
after block 3's last ReLU. ``layout=stages`` attends to the stage maps everywhere (the rule before this
option, i.e. ``f0, f1, f2, f4`` on a VGG, whose pairs with a MobileNetV2 differ in resolution at every
stage).

Pairs: map ``i`` of the student with map ``i`` of the teacher when both networks give the same number of
maps (every map, as the paper's group outputs and RepDistiller's ``zip(feat_s[1:-1], feat_t[1:-1])``: on
VGG-13 -> MobileNetV2 at 32x32 that is 16/16, 8/8, 4/4 and 4/2 pixels, teacher/student, the peers' pairs);
otherwise each student map with the deepest teacher map of the same stride (resolution), maps without a
partner being skipped. Here we differ from the peers, whose ``zip`` pairs the first ``min(n_s, n_t)`` maps
by index whatever their resolutions. Maps of one pair that still differ in size are compared at the
smaller resolution: we average-pool the channel-mean energy ``mean_c(F^2)`` of the larger one before the
normalisation, whereas RepDistiller's and mdistiller's ``at_loss`` average-pool the feature map ``F`` itself
and then square (``mean_c(pool(F)^2)`` instead of ``pool(mean_c(F^2))``; the paper only pairs maps of equal
size). ``kd_weight > 0`` adds Hinton KD (AT+KD in the paper; off by default). Heads: ``net``. Deploy: the
student.

Maps: by default the backbone contract's stage maps (post-activation: on a WRN the BN-ReLU that the next
block applies, see :mod:`fusionkd.models.base`). ``maps=raw`` takes the raw stage outputs instead, which is
what the authors' WRN code attends to (its ``f`` returns the group outputs ``g0, g1, g2``, residual sums
before the next block's BN-ReLU). On post-activation networks (ResNets, VGG) the two are the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models import StageInfo, stage_maps
from ..models.vgg import VGG
from ._offline import OfflineMethod, check_classifier_trained, check_temperature, check_weights
from .base import MethodContext, register_method
from .kd import kd_terms
from .losses import attention_transfer

MAP_KINDS = ("post", "raw")
LAYOUTS = ("peers", "stages")


@dataclass
class ATOptions:
    """Options of ``at``.

    Attributes:
        at_weight: ``beta``; the loss is ``beta / 2 * sum of the pair losses`` (paper: 1000).
        ce_weight: ``gamma``, weight of the cross-entropy with the labels.
        kd_weight: ``alpha``, weight of an optional Hinton KD term (0 = off).
        temperature: ``T`` of the optional KD term.
        logit_std: logit standardization of the optional KD term (Sun et al., CVPR 2024).
        maps: ``post`` (the contract's stage maps) or ``raw`` (the raw stage outputs, as the AT authors'
            WRN code; differs from ``post`` on pre-activation networks only).
        layout: ``peers`` (RepDistiller's / mdistiller's maps ``f1 .. f4`` on a VGG, the stage maps on
            every other network) or ``stages`` (the stage maps on every network: ``f0, f1, f2, f4`` on a VGG).
    """

    at_weight: float = 1000.0
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    temperature: float = 4.0
    logit_std: bool = False
    maps: str = "post"
    layout: str = "peers"

    def validate(self) -> None:
        if self.maps not in MAP_KINDS:
            raise ValueError(f"maps must be one of {', '.join(MAP_KINDS)}, got {self.maps!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        check_weights(at_weight=self.at_weight, ce_weight=self.ce_weight, kd_weight=self.kd_weight)
        check_classifier_trained(self.ce_weight, self.kd_weight)
        check_temperature(self.temperature)


def vgg_block3_end(net: nn.Module) -> int | None:
    """How many modules of a zoo VGG's stage 3 (``pool, block3, block4``) produce RepDistiller's ``f3``
    (block 3's last ReLU output); ``None`` for any other network."""
    if not isinstance(net, VGG) or len(net.stages) != 4:
        return None
    per_conv = 3 if net.batch_norm else 2  # conv [-> BN] -> ReLU
    return 1 + per_conv * len(net.config[3])


def attention_maps_info(net: nn.Module, layout: str = "peers") -> list[StageInfo]:
    """What each map that AT attends to is (``name`` = its module path, channels, stride): the stage maps,
    or on a VGG with ``layout="peers"`` RepDistiller's ``f1, f2, f3, f4``."""
    info = list(net.stage_info)
    k = vgg_block3_end(net) if layout == "peers" else None
    if k is None:
        return info
    f3 = StageInfo(f"{info[3].name}.{k - 1}", net.config[3][-1], info[3].stride)
    return [info[1], info[2], f3, info[3]]


def attention_maps(net: nn.Module, images: torch.Tensor, raw: bool = False, layout: str = "peers"
                   ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The maps AT attends to (see :func:`attention_maps_info`) and the logits, from one forward of ``net``."""
    k = vgg_block3_end(net) if layout == "peers" else None
    if k is None:
        maps, raw_maps = stage_maps(net, images)
        return (raw_maps if raw else maps), net.forward_head(maps[-1])
    # a VGG (post-activation: raw and post maps are the same tensors); stage 3 is run module by module
    x = net.stem(images)
    maps = []
    for stage in list(net.stages)[:3]:
        x = stage(x)
        maps.append(x)
    for i, module in enumerate(net.stages[3]):
        x = module(x)
        if i == k - 1:
            maps.append(x)  # f3, block 3's last ReLU output (block 4's first conv reads it unchanged)
    maps.append(x)
    return maps[1:], net.forward_head(x)


def attention_pairs(student: list[StageInfo], teacher: list[StageInfo]) -> list[tuple[int, int]]:
    """``(student map, teacher map)`` pairs: by index when the map counts match, else by stride."""
    if len(student) == len(teacher):
        return [(i, i) for i in range(len(student))]
    pairs = []
    for i, s in enumerate(student):
        same = [j for j, t in enumerate(teacher) if t.stride == s.stride]
        if same:
            pairs.append((i, same[-1]))
    if not pairs:
        raise ValueError(
            "attention transfer found no student/teacher stages of the same resolution: student strides "
            f"{[s.stride for s in student]}, teacher strides {[t.stride for t in teacher]}"
        )
    return pairs


def attention_pair_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """``mean((phi(s) - phi(t))^2)`` over batch and positions (Zagoruyko & Komodakis 2017), teacher detached.

    ``phi(F) = normalize(mean_c(F^2).flatten())`` per sample. Maps ``(B, C_s, H_s, W_s)`` and
    ``(B, C_t, H_t, W_t)`` may differ in channels; when they differ in size, each energy map
    ``mean_c(F^2)`` is average-pooled to the smaller ``(H, W)`` before the normalisation.
    """
    if student_map.shape[-2:] == teacher_map.shape[-2:]:
        return attention_transfer(student_map, teacher_map)
    size = (min(student_map.shape[-2], teacher_map.shape[-2]), min(student_map.shape[-1], teacher_map.shape[-1]))

    def phi(f: torch.Tensor) -> torch.Tensor:
        energy = F.adaptive_avg_pool2d(f.float().pow(2).mean(dim=1, keepdim=True), size)
        return F.normalize(energy.flatten(1), dim=1)

    return (phi(student_map) - phi(teacher_map.detach())).pow(2).mean()


@register_method("at", "attention transfer from a pre-trained teacher: CE + 1000/2 * sum of stage AT losses")
class AT(OfflineMethod):
    """Attention transfer: the student's stage attention maps follow the teacher's."""
    recipe_epochs = 200  #: the authors' code (beta=1000): 200 epochs, x0.2 at 60, 120, 160

    Options = ATOptions

    def __init__(self, ctx: MethodContext, options: ATOptions | None = None) -> None:
        super().__init__(ctx, options)
        layout = self.options.layout
        self.student_maps = attention_maps_info(self.net, layout)
        self.teacher_maps = attention_maps_info(self.teacher, layout)
        self.pairs = attention_pairs(self.student_maps, self.teacher_maps)

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        opts = self.options
        raw = opts.maps == "raw"
        if self.teacher_maps == self.teacher.stage_info:
            t_maps, t_logits = self.teacher_forward(images, raw=raw)
        else:
            with torch.no_grad():  # the frozen teacher, as in OfflineMethod.teacher_forward
                t_maps, t_logits = attention_maps(self.teacher, images, raw, opts.layout)
        if self.student_maps == self.net.stage_info:
            s_maps, s_logits = self.student_forward(images, raw=raw)
        else:
            s_maps, s_logits = attention_maps(self.net, images, raw, opts.layout)
        terms = kd_terms(s_logits, t_logits, labels, opts)
        if opts.at_weight > 0:
            pair_losses = [attention_pair_loss(s_maps[i], t_maps[j]) for i, j in self.pairs]
            terms["loss_at"] = opts.at_weight / 2 * torch.stack(pair_losses).sum()
        return terms

    def summary_extras(self) -> dict:
        return {**super().summary_extras(), "attention_pairs": [list(p) for p in self.pairs],
                "attention_maps": {"student": [m.name for m in self.student_maps],
                                   "teacher": [m.name for m in self.teacher_maps]}}
