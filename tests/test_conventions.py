"""Conventions that the docs compare with other code bases (issue #24): which maps AT attends to on VGG
(RepDistiller's / mdistiller's ``f1 .. f4``), FitNet's default stages against RepDistiller's
``hint_layer=2``, and the one BYOT setting that reaches Self-KD-Lib's loss (half of it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusionkd.methods import METHODS, MethodContext, Teacher
from fusionkd.methods.at import ATOptions, attention_maps_info, attention_pair_loss
from fusionkd.methods.byot import BYOTOptions
from fusionkd.methods.fitnet import FitNetOptions
from fusionkd.models import create_model


def _offline(method: str, teacher_name: str, student: str, options=None, image_size: int = 32):
    torch.manual_seed(0)
    teacher = create_model(teacher_name, num_classes=10).eval()
    ctx = MethodContext(model=student, num_classes=10, in_chans=3, image_size=image_size, epochs=2,
                        teacher=Teacher(teacher, teacher_name, {}))
    return METHODS.get(method)(ctx, options)


def _repdistiller_vgg_feats(vgg: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """RepDistiller's VGG ``forward(is_feat=True)`` features ``f0 .. f4`` written out from the blocks:
    ``f0 .. f2`` end stages 0-2, ``f3`` is the last ReLU of block 3, which sits inside stage 3
    (``pool, block3, block4``), and ``f4`` ends stage 3."""
    f0 = vgg.stages[0](vgg.stem(x))
    f1 = vgg.stages[1](f0)
    f2 = vgg.stages[2](f1)
    stage3 = list(vgg.stages[3])
    n3 = len(vgg.config[3]) * (3 if vgg.batch_norm else 2)  # conv, BN, ReLU per conv of block 3
    f3 = nn.Sequential(*stage3[:1 + n3])(f2)
    assert isinstance(stage3[n3], nn.ReLU)  # the module producing f3 is block 3's last ReLU
    f4 = nn.Sequential(*stage3[1 + n3:])(f3)
    return [f0, f1, f2, f3, f4]


def _at_by_hand(student_maps, teacher_maps, pairs, beta: float = 1000.0) -> torch.Tensor:
    return beta / 2 * sum(attention_pair_loss(student_maps[i], teacher_maps[j]) for i, j in pairs)


# ----------------------------------------------------------------------------- at on VGG
def test_at_vgg13_to_mobilenetv2_pairs_the_peers_maps():
    """RepDistiller and mdistiller pair ``zip(feat_s[1:-1], feat_t[1:-1])``: VGG-13's f1..f4 with
    MobileNetV2's f1..f4 (our MobileNetV2 stages), at 32x32 16/16, 8/8, 4/4 and 4/2 pixels."""
    at = _offline("at", "vgg13", "mobilenetv2").eval()
    assert at.pairs == [(0, 0), (1, 1), (2, 2), (3, 3)]
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    with torch.no_grad():
        t_feats = _repdistiller_vgg_feats(at.teacher, x)[1:]
        s_maps = at.net.forward_stages(x)
        sides = [(s.shape[-1], t.shape[-1]) for s, t in zip(s_maps, t_feats)]
        assert sides == [(16, 16), (8, 8), (4, 4), (2, 4)]
        loss = at.training_step(x, y, 0)["loss_at"]
        expected = _at_by_hand(s_maps, t_feats, at.pairs)
    assert torch.allclose(loss, expected, rtol=1e-5)
    extras = at.summary_extras()["attention_maps"]
    assert extras["teacher"] == ["stages.1", "stages.2", "stages.3.6", "stages.3"]
    assert extras["student"] == ["stages.0", "stages.1", "stages.2", "stages.3"]


def test_at_vgg13_to_vgg8_pairs_equal_resolutions():
    at = _offline("at", "vgg13", "vgg8").eval()
    assert at.pairs == [(0, 0), (1, 1), (2, 2), (3, 3)]
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    with torch.no_grad():
        t_feats = _repdistiller_vgg_feats(at.teacher, x)[1:]
        s_feats = _repdistiller_vgg_feats(at.net, x)[1:]
        assert [f.shape[-1] for f in s_feats] == [f.shape[-1] for f in t_feats] == [16, 8, 4, 4]
        loss = at.training_step(x, y, 0)["loss_at"]
        expected = _at_by_hand(s_feats, t_feats, at.pairs)
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert at.summary_extras()["attention_maps"]["student"] == ["stages.1", "stages.2", "stages.3.3", "stages.3"]


def test_at_student_vgg_gets_gradients_through_f3():
    """The student's f3 is read inside stage 3: the AT term reaches block 3's weights through it and the
    logits (CE) still come from the whole network."""
    at = _offline("at", "vgg13", "vgg8").train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    terms = at.training_step(x, y, 0)
    terms["loss_at"].backward()
    assert at.net.stages[3][1].weight.grad.abs().sum() > 0  # block 3's conv
    assert at.net.head.fc.weight.grad is None  # nothing of the AT term reaches the classifier
    with torch.no_grad():
        ce = F.cross_entropy(at.net(x), y)  # train-mode BN: the same batch statistics as the step
    assert torch.allclose(terms["loss_ce"], ce, rtol=1e-5)


def test_at_layout_stages_keeps_the_stage_maps():
    """``layout=stages``: the stage maps everywhere (VGG's f0, f1, f2, f4), the rule before ``layout``."""
    at = _offline("at", "vgg13", "mobilenetv2", ATOptions(layout="stages")).eval()
    assert at.summary_extras()["attention_maps"]["teacher"] == ["stages.0", "stages.1", "stages.2", "stages.3"]
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    with torch.no_grad():
        s_maps, t_maps = at.net.forward_stages(x), at.teacher.forward_stages(x)
        assert [(s.shape[-1], t.shape[-1]) for s, t in zip(s_maps, t_maps)] == [(16, 32), (8, 16), (4, 8), (2, 4)]
        loss = at.training_step(x, y, 0)["loss_at"]
    assert torch.allclose(loss, _at_by_hand(s_maps, t_maps, at.pairs), rtol=1e-5)


def test_at_layout_only_changes_vgg_and_is_validated():
    for teacher, student in (("resnet32", "resnet20"), ("resnet18", "mobilenetv2")):
        at = _offline("at", teacher, student)
        maps = at.summary_extras()["attention_maps"]
        assert maps["teacher"] == [s.name for s in at.teacher.stage_info]
        assert maps["student"] == [s.name for s in at.net.stage_info]
    vgg_plain = create_model("vgg8", num_classes=10, batch_norm=False)  # conv, ReLU per layer
    assert [m.name for m in attention_maps_info(vgg_plain)] == ["stages.1", "stages.2", "stages.3.2", "stages.3"]
    assert isinstance(vgg_plain.stages[3][2], nn.ReLU)
    with pytest.raises(ValueError, match="layout must be one of peers, stages"):
        ATOptions(layout="repdistiller").validate()


# ----------------------------------------------------------------------------- fitnet vs hint_layer=2
def test_fitnet_default_stages_against_repdistiller_hint_layer_2():
    """docs/methods/offline.md: RepDistiller's ``feat[2]`` is our stage 1 on MobileNetV2 / ResNet-18/50
    (default there: stage 2) and our default ``n // 2`` on the 3-stage ResNets and on VGG."""
    fit = _offline("fitnet", "vgg13", "mobilenetv2")
    assert (fit.student_stage, fit.teacher_stage) == (2, 2)
    peers = _offline("fitnet", "vgg13", "mobilenetv2", FitNetOptions(student_stage=1))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t_f2 = _repdistiller_vgg_feats(peers.teacher, x)[2]
        s_maps = peers.net.forward_stages(x)
    assert torch.equal(peers.teacher.forward_stages(x)[peers.teacher_stage], t_f2)  # VGG: feat[2] = stage 2
    assert tuple(t_f2.shape[1:]) == (256, 8, 8)
    assert tuple(s_maps[peers.student_stage].shape[1:]) == (16, 8, 8)  # MobileNetV2's f2 (group 3)
    assert tuple(s_maps[fit.student_stage].shape[1:]) == (48, 4, 4)  # the default: a stage deeper
    r = _offline("fitnet", "resnet18", "resnet18")
    assert (r.student_stage, r.teacher_stage) == (2, 2)  # feat[2] = layer2 = our stage 1 on both
    three = _offline("fitnet", "resnet32", "resnet20")
    assert (three.student_stage, three.teacher_stage) == (1, 1)  # feat[2] = layer2 = stage 1: parity


# ----------------------------------------------------------------------------- byot vs Self-KD-Lib
def test_byot_reaches_half_of_self_kd_libs_ce_and_kd_terms():
    """``alpha=0.5 t_squared=true temperature=4 feature_weight=0`` is half of Self-KD-Lib's
    ``sum CE + sum_i T^2 KL(z_L -> z_i)`` (docs/methods/self.md, byot.py)."""
    torch.manual_seed(0)
    ctx = MethodContext(model="resnet20", num_classes=10, in_chans=1, image_size=28, epochs=2)
    opts = BYOTOptions(alpha=0.5, t_squared=True, temperature=4.0, feature_weight=0.0)
    byot = METHODS.get("byot")(ctx, opts).eval()
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        out = byot.forward_all(x)
        ours = sum(byot.losses(out, y).values())
        ce = sum(F.cross_entropy(z, y) for z in [out.deep_logits, *out.branch_logits])
        T = 4.0
        p_t = F.softmax(out.deep_logits / T, dim=1)
        kd = sum(F.kl_div(F.log_softmax(z / T, dim=1), p_t, reduction="batchmean") * T ** 2
                 for z in out.branch_logits)  # Self-KD-Lib's DistillKL
    assert torch.allclose(ours, 0.5 * (ce + kd), rtol=1e-5)


# ----------------------------------------------------------------------------- WRN vs the FRSKD authors' WRN
def test_wrn_batchnorm_count_behind_the_frskd_note():
    """docs/methods/self.md: our WRN (RepDistiller's) has two BNs per block plus the head's, 6n + 1 for n
    blocks per stage; the FRSKD authors' has one per block (``bn2``) plus one per stage end, 3n + 3 used.
    The difference 3n - 2 is 4 on WRN-16-x and 16 on WRN-40-x."""
    for name, n in (("wrn_16_2", 2), ("wrn_40_2", 6)):
        net = create_model(name, num_classes=10)
        bns = [k for k, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(bns) == 6 * n + 1
        # the authors' stage-end BNs are our next stage's first bn1 and the head's BN; the rest have no
        # counterpart: the first block's bn1 (on the stem output) and every later block's bn1
        extra = ["stages.0.0.bn1"] + [f"stages.{s}.{b}.bn1" for s in range(3) for b in range(1, n)]
        assert set(extra) <= set(bns) and len(extra) == 3 * n - 2
        assert len(bns) - len(extra) == 3 * n + 3
