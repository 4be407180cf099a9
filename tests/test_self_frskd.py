"""FRSKD (Ji et al., CVPR 2021): the self-teacher's wiring and shapes, its loss terms against hand-computed
values, and which parameters each loss term trains."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from gradflow import batch, build_method, reached, under
from handmath import ce_row, kl_t

from fusionkd.methods.frskd import (
    FRSKD,
    FRSKDOptions,
    FRSKDOutputs,
    SelfTeacher,
    fast_normalized_weights,
    max_pool_same,
    resize_up,
)
from fusionkd.models import create_model


def make(model: str = "resnet20", size: int = 28, in_chans: int = 1, **options) -> FRSKD:
    return build_method(FRSKD, model, size, in_chans, **options)


# ----------------------------------------------------------------------------- self-teacher
@pytest.mark.parametrize(
    "model, size, in_chans",
    [("resnet20", 28, 1), ("resnet20", 32, 3), ("resnet18", 28, 1), ("resnet18", 32, 3), ("wrn_16_2", 28, 1)],
)
def test_refined_maps_have_the_stage_resolution_and_width_times_channels(model, size, in_chans):
    m = make(model, size, in_chans).eval()
    x, _ = batch(size, in_chans, n=2)
    with torch.no_grad():
        out = m.forward_all(x)
    info = m.net.stage_info
    assert len(out.refined) == len(info) == len(out.maps)
    for f, t, s in zip(out.maps, out.refined, info):
        assert t.shape == (2, 2 * s.channels, *f.shape[-2:])
        assert bool((t >= 0).all())  # outputs are ReLU(T_i)
    assert out.teacher_logits.shape == (2, 10)


def test_width_option_sets_the_refined_channels():
    m = make(width=3).eval()
    with torch.no_grad():
        out = m.forward_all(batch(n=2)[0])
    assert [t.shape[1] for t in out.refined] == [48, 96, 192]
    assert m.teacher.fc.in_features == 192


def test_fast_normalised_fusion_weights():
    w = fast_normalized_weights(torch.tensor([1.0, -1.0, 3.0]))
    assert torch.allclose(w, torch.tensor([1 / 4.000001, 0.0, 3 / 4.000001]), atol=0, rtol=1e-6)
    assert float(fast_normalized_weights(torch.tensor([-2.0, -1.0])).abs().sum()) == 0.0
    m = make()
    weights = list(m.teacher.up_weights) + list(m.teacher.down_weights)
    assert [tuple(p.shape) for p in weights] == [(2,), (2,), (3,), (2,)]  # n=3: 2 top-down, 2 bottom-up nodes
    assert all(bool((p == 1).all()) and p.requires_grad for p in weights)


def test_fusion_weights_route_the_levels():
    """With b = c = 0 every node sees only its own lateral, so each refined map depends on its own level only;
    with the default weights T_1 depends on every level (top-down path)."""
    teacher = SelfTeacher([4, 8, 16], num_classes=3).eval()
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, c, s, s, generator=g) for c, s in [(4, 8), (8, 4), (16, 2)]]
    poked = [f.clone() for f in feats]
    poked[2] = poked[2] + 1.0
    with torch.no_grad():
        base, _ = teacher(feats)
        moved, _ = teacher(poked)
        assert not torch.allclose(base[0], moved[0])  # T_1 = P_1 sees F_3 through the top-down path
        for p in teacher.up_weights:
            p.copy_(torch.tensor([1.0, 0.0]))
        teacher.down_weights[0].copy_(torch.tensor([1.0, 0.0, 0.0]))
        teacher.down_weights[1].copy_(torch.tensor([1.0, 0.0]))
        base, _ = teacher(feats)
        moved, _ = teacher(poked)
    assert torch.equal(base[0], moved[0]) and torch.equal(base[1], moved[1])
    assert not torch.allclose(base[2], moved[2])


def test_self_teacher_follows_the_formulas():
    """The BiFPN written out literally (every ReLU of the formulas, the released code's nn.Upsample x2 and
    zero-padded TF-"same" max-pool) with the self-teacher's own blocks and random fusion weights."""
    torch.manual_seed(0)
    t = SelfTeacher([4, 8, 16], num_classes=3, upsample="nearest").eval()
    with torch.no_grad():
        for p in list(t.up_weights) + list(t.down_weights):
            p.copy_(torch.rand(p.shape) * 2 - 0.5)  # some negative: ReLU'd to 0 by the normalisation
    feats = [torch.randn(2, c, s, s) for c, s in [(4, 8), (8, 4), (16, 2)]]
    relu = F.relu

    def norm(p):
        w = relu(p)
        return w / (w.sum() + 1e-6)

    def up(x):
        return F.interpolate(x, scale_factor=2, mode="nearest")

    def down(x):  # ReLU'd inputs: zero padding (as released) == -inf padding; even sizes pad bottom/right
        return F.max_pool2d(F.pad(x, [0, 1, 0, 1]), 3, 2)

    with torch.no_grad():
        L = [t.lateral[i](relu(feats[i])) for i in range(3)]
        L2 = {i: t.lateral2[i - 1](relu(feats[i])) for i in (1, 2)}
        P = {2: L[2]}
        for i in (1, 0):
            a, b = norm(t.up_weights[i])
            P[i] = t.up_blocks[i](a * relu(L[i]) + b * t.up_proj[i](up(relu(P[i + 1]))))
        T = {0: P[0]}
        a, b, c = norm(t.down_weights[0])
        T[1] = t.down_blocks[0](a * relu(L2[1]) + b * relu(P[1]) + c * t.down_proj[0](down(relu(T[0]))))
        a, c = norm(t.down_weights[1])
        T[2] = t.down_blocks[1](a * relu(L2[2]) + c * t.down_proj[1](down(relu(T[1]))))
        logits = t.fc(relu(T[2]).mean(dim=(2, 3)))
        refined, z = t(feats)
    for i in range(3):
        assert torch.allclose(refined[i], relu(T[i]), atol=1e-6)
    assert torch.allclose(z, logits, atol=1e-6)


def test_upsample_modes_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    nearest = resize_up(x, (4, 4), "nearest")[0, 0]
    assert torch.equal(nearest, torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]))
    # bilinear, half-pixel centres: source coordinate (o + 0.5) / 2 - 0.5 clamped -> weights 0, .25, .75, 1
    w = torch.tensor([0.0, 0.25, 0.75, 1.0])
    expected = 1.0 + 2.0 * w.view(4, 1) + 1.0 * w.view(1, 4)
    assert torch.allclose(resize_up(x, (4, 4), "bilinear")[0, 0], expected)
    # the released code's nn.Upsample(scale_factor=2, mode="nearest") is the same on even sizes
    y = torch.randn(2, 3, 7, 7)
    assert torch.equal(resize_up(y, (14, 14), "nearest"), F.interpolate(y, scale_factor=2, mode="nearest"))
    # odd target sizes work (ResNet-18 at 28x28: 4x4 -> 7x7)
    assert resize_up(torch.randn(1, 2, 4, 4), (7, 7), "bilinear").shape == (1, 2, 7, 7)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_both_upsample_modes_train(mode):
    m = make(upsample=mode)
    x, y = batch()
    terms = m.training_step(x, y, 0)
    assert all(bool(torch.isfinite(v)) for v in terms.values())
    sum(terms.values()).backward()
    assert m.teacher.up_proj[0][0].weight.grad is not None


def test_upsample_modes_differ():
    x, _ = batch(n=2)
    outs = []
    for mode in ("bilinear", "nearest"):
        m = make(upsample=mode).eval()
        with torch.no_grad():
            outs.append(m.forward_all(x).refined[0])
    assert not torch.allclose(outs[0], outs[1])


def test_max_pool_same_by_hand():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # TF "same": 4x4 -> 2x2, padding only at the bottom/right, windows start at row/column 0
    assert torch.equal(max_pool_same(x, (2, 2))[0, 0], torch.tensor([[10.0, 11.0], [14.0, 15.0]]))
    neg = -torch.arange(9.0).view(1, 1, 3, 3) - 1  # all negative: padding never wins
    assert torch.equal(max_pool_same(neg, (2, 2))[0, 0], torch.tensor([[-1.0, -2.0], [-4.0, -5.0]]))
    for h, target in [(28, 14), (14, 7), (7, 4), (8, 4)]:
        assert max_pool_same(torch.randn(1, 2, h, h), (target, target)).shape[-2:] == (target, target)
    # the released code's explicit padding (total 2 (ceil(H/2) - 1) + 3 - H, extra pixel bottom/right)
    for h, w in [(5, 6), (6, 5), (7, 7), (9, 4)]:
        x = torch.randn(2, 3, h, w)
        ph, pw = 2 * (math.ceil(h / 2) - 1) + 3 - h, 2 * (math.ceil(w / 2) - 1) + 3 - w
        padded = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], value=float("-inf"))
        target = (math.ceil(h / 2), math.ceil(w / 2))
        assert torch.equal(max_pool_same(x, target), F.max_pool2d(padded, 3, 2))


# ----------------------------------------------------------------------------- loss terms
def test_attention_transfer_term_by_hand():
    f = torch.tensor([[1.0, 2.0], [2.0, 0.0]]).view(1, 1, 2, 2)  # c=1: mean_c f^2 = [1, 4, 4, 0]
    t = torch.stack([torch.ones(2, 2), torch.tensor([[1.0, -1.0], [3.0, 1.0]])]).unsqueeze(0)  # mean t^2 = [1,1,5,1]
    phi_f = [v / math.sqrt(33.0) for v in (1, 4, 4, 0)]
    phi_t = [v / math.sqrt(28.0) for v in (1, 1, 5, 1)]
    expected = sum((a - b) ** 2 for a, b in zip(phi_f, phi_t)) / 4
    m = make(beta=3.0)
    logits = torch.zeros(1, 10)
    out = FRSKDOutputs(maps=[f, f], logits=logits, refined=[t, t], teacher_logits=logits)
    assert m.losses(out, torch.tensor([0]))["loss_at"].item() == pytest.approx(3.0 * 2 * expected, rel=1e-6)
    # a refined map with another channel count but the same spatial attention gives zero
    same = FRSKDOutputs(maps=[f], logits=logits, refined=[torch.cat([f, -f, 2 * f], 1)], teacher_logits=logits)
    assert m.losses(same, torch.tensor([0]))["loss_at"].item() == pytest.approx(0.0, abs=1e-12)


def test_ce_and_kd_terms_by_hand():
    zc = [1.0, 2.0, 0.0]
    zt = [2.0, 0.0, 1.0]
    label, temp, alpha = 1, 4.0, 2.0

    ce_c, ce_t = ce_row(zc, label), ce_row(zt, label)
    m = make(alpha=alpha, temperature=temp)
    f = torch.ones(1, 1, 2, 2)
    out = FRSKDOutputs(maps=[f], logits=torch.tensor([zc]), refined=[f], teacher_logits=torch.tensor([zt]))
    terms = m.losses(out, torch.tensor([label]))
    assert terms["loss_ce"].item() == pytest.approx(ce_c, rel=1e-6)
    assert terms["loss_ce_teacher"].item() == pytest.approx(ce_t, rel=1e-6)
    assert terms["loss_kd"].item() == pytest.approx(alpha * kl_t(zt, zc, temp), rel=1e-5)
    assert set(terms) == {"loss_ce", "loss_ce_teacher", "loss_kd", "loss_at"}


def test_training_step_is_the_loss_of_one_forward():
    m = make()
    x, y = batch()
    terms = m.training_step(x, y, 0)
    again = m.losses(m.forward_all(x), y)
    for k in terms:
        assert torch.allclose(terms[k], again[k], rtol=1e-5, atol=1e-6), k


# ----------------------------------------------------------------------------- gradient flow
def test_gradient_flow_of_each_term():
    m = make()
    x, y = batch()
    terms = m.losses(m.forward_all(x), y)
    params = {n for n, _ in m.named_parameters()}
    teacher = under(params, "teacher.")
    classifier = under(params, "net.")
    stages = [f"net.stages.{i}." for i in range(3)] + ["net.stem."]

    kd = reached(m, terms["loss_kd"])
    assert kd <= classifier and under(kd, "net.head.fc.") and all(under(kd, s) for s in stages)
    at = reached(m, terms["loss_at"])
    assert at <= classifier and not under(at, "net.head.") and all(under(at, s) for s in stages)
    ce_t = reached(m, terms["loss_ce_teacher"])
    assert not under(ce_t, "net.head.") and all(under(ce_t, s) for s in stages)  # maps are not detached
    groups = ["lateral.", "lateral2.", "up_proj.", "up_blocks.", "up_weights.", "down_proj.", "down_blocks.",
              "down_weights.", "fc."]
    assert all(under(ce_t, "teacher." + g) for g in groups)
    assert under(ce_t, "teacher.") == teacher  # every self-teacher parameter feeds z_t
    ce_c = reached(m, terms["loss_ce"])
    assert ce_c <= classifier and not (ce_c & teacher)


def test_bf16_autocast_and_channels_last():
    m = make().to(memory_format=torch.channels_last)
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = m.training_step(x.to(memory_format=torch.channels_last), y, 0)
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v)) for v in terms.values())


def test_options_are_validated():
    with pytest.raises(ValueError, match="upsample"):
        FRSKDOptions(upsample="bicubic").validate()
    with pytest.raises(ValueError, match="temperature"):
        FRSKDOptions(temperature=0).validate()
    with pytest.raises(ValueError, match="at least two stage maps"):
        SelfTeacher([16], num_classes=10)
    assert FRSKD.recipe == {"weight_decay": 1e-4}
    assert create_model("resnet20", num_classes=10, in_chans=1).num_stages == 3
