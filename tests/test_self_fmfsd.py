"""FMFSD (our reading of Qin et al. 2025): spatial-enhancement masks, mask averaging, the fused map and every
loss term against hand-computed values; heads; which parameters each loss term trains."""

from __future__ import annotations

import math

import pytest
import torch
from gradflow import batch, build_method, reached, under
from handmath import ce_row, kl_t

from fusionkd.methods.fmfsd import FMFSD, FeatureMapFusion, FMFSDOptions, FMFSDOutputs, SpatialEnhancement


def make(model: str = "resnet20", size: int = 28, in_chans: int = 1, **options) -> FMFSD:
    return build_method(FMFSD, model, size, in_chans, **options)


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


# two 2-channel 2x2 maps used by the hand-computed tests; per-pixel channel mean and max:
G1 = torch.tensor([[[1.0, 2.0], [0.0, 4.0]], [[3.0, 0.0], [2.0, 0.0]]]).unsqueeze(0)  # mean 2,1,1,2; max 3,2,2,4
G2 = torch.tensor([[[0.0, 1.0], [1.0, 1.0]], [[2.0, 1.0], [3.0, 1.0]]]).unsqueeze(0)  # mean 1,1,2,1; max 2,1,3,1
MEAN1, MAX1 = [2.0, 1.0, 1.0, 2.0], [3.0, 2.0, 2.0, 4.0]
MEAN2, MAX2 = [1.0, 1.0, 2.0, 1.0], [2.0, 1.0, 3.0, 1.0]


def set_center_taps(se: SpatialEnhancement, w_mean: float, w_max: float, bias: float) -> None:
    """A 7x7 conv whose only non-zero taps are the centre ones: A = sigmoid(w_mean mean_c + w_max max_c + b)."""
    with torch.no_grad():
        se.conv.weight.zero_()
        se.conv.weight[0, 0, 3, 3] = w_mean
        se.conv.weight[0, 1, 3, 3] = w_max
        se.conv.bias.fill_(bias)


# ----------------------------------------------------------------------------- fusion module
def test_spatial_enhancement_mask_by_hand():
    se = SpatialEnhancement()
    set_center_taps(se, 0.5, -0.25, 0.1)
    expected = torch.tensor([sigmoid(0.5 * a - 0.25 * b + 0.1) for a, b in zip(MEAN1, MAX1)]).view(1, 1, 2, 2)
    assert torch.allclose(se(G1), expected, atol=1e-7)
    # an off-centre tap reads the neighbour to the right (zero padding past the border)
    with torch.no_grad():
        se.conv.weight.zero_()
        se.conv.weight[0, 0, 3, 4] = 1.0
        se.conv.bias.zero_()
    right = [MEAN1[1], 0.0, MEAN1[3], 0.0]
    assert torch.allclose(se(G1), torch.tensor([sigmoid(v) for v in right]).view(1, 1, 2, 2), atol=1e-7)


@pytest.mark.parametrize("residual", [False, True])
def test_mask_average_and_fused_map_by_hand(residual):
    fusion = FeatureMapFusion(2, residual=residual)
    set_center_taps(fusion.enhance[0], 1.0, 0.0, -1.0)  # A_1 = sigmoid(mean_c G_1 - 1)
    set_center_taps(fusion.enhance[1], 0.0, 1.0, -2.0)  # A_2 = sigmoid(max_c G_2 - 2)
    a1 = [sigmoid(v - 1.0) for v in MEAN1]
    a2 = [sigmoid(v - 2.0) for v in MAX2]
    a_bar = [(u + v) / 2 for u, v in zip(a1, a2)]
    fused, mean_mask, masks = fusion([G1, G2])
    assert torch.allclose(masks[0].flatten(), torch.tensor(a1), atol=1e-7)
    assert torch.allclose(masks[1].flatten(), torch.tensor(a2), atol=1e-7)
    assert torch.allclose(mean_mask.flatten(), torch.tensor(a_bar), atol=1e-7)
    g1, g2 = G1.view(2, 4).tolist(), G2.view(2, 4).tolist()
    expected = [[(g1[c][p] + g2[c][p]) / 2 * (a_bar[p] + (1.0 if residual else 0.0)) for p in range(4)]
                for c in range(2)]
    assert torch.allclose(fused.view(2, 4), torch.tensor(expected), atol=1e-6)


def test_fusion_module_checks_the_number_of_maps():
    with pytest.raises(ValueError, match="built for 2 maps"):
        FeatureMapFusion(2)([G1])


# ----------------------------------------------------------------------------- loss
def test_every_loss_term_by_hand():
    alpha, gamma, lam, temp = 0.5, 2.0, 0.1, 3.0
    z1, z2, zl, zf = [0.5, -1.0, 2.0], [1.0, 1.0, 0.0], [3.0, 0.0, -1.0], [0.0, 2.0, 1.0]
    label = 1

    def kl(t_logits, s_logits):
        return kl_t(t_logits, s_logits, temp)

    def ce(z):
        return ce_row(z, label)

    fused = (G1 + G2) / 4  # any map: the loss treats it as a detached target
    mse = [((G1 - fused) ** 2).mean().item(), ((G2 - fused) ** 2).mean().item()]
    hand = [sum((a - b / 4 - c / 4) ** 2 for a, b, c in zip(G.flatten().tolist(), G1.flatten().tolist(),
                                                            G2.flatten().tolist())) / 8 for G in (G1, G2)]
    assert mse == pytest.approx(hand)
    t = torch.tensor
    out = FMFSDOutputs(branch_maps=[G1, G2], branch_logits=[t([z1]), t([z2])], deep_map=G2, deep_logits=t([zl]),
                       fused_map=fused, fused_logits=t([zf]), mean_mask=torch.ones(1, 1, 2, 2))
    m = make(alpha=alpha, gamma=gamma, feature_weight=lam, temperature=temp)
    terms = m.losses(out, t([label]))
    assert terms["loss_ce_branches"].item() == pytest.approx(ce(z1) + ce(z2), rel=1e-6)
    assert terms["loss_ce_net"].item() == pytest.approx(ce(zl), rel=1e-6)
    assert terms["loss_ce_fused"].item() == pytest.approx(ce(zf), rel=1e-6)
    assert terms["loss_kd_net"].item() == pytest.approx(alpha * (kl(zl, z1) + kl(zl, z2)), rel=1e-5)
    assert terms["loss_kd_fused"].item() == pytest.approx(gamma * (kl(zf, z1) + kl(zf, z2)), rel=1e-5)
    assert terms["loss_feat"].item() == pytest.approx(lam * sum(hand), rel=1e-6)


def test_training_step_is_the_loss_of_one_forward():
    m = make()
    x, y = batch()
    terms = m.training_step(x, y, 0)
    again = m.losses(m.forward_all(x), y)
    assert set(terms) == {"loss_ce_branches", "loss_ce_net", "loss_ce_fused", "loss_kd_net", "loss_kd_fused",
                          "loss_feat"}
    for k in terms:
        assert torch.allclose(terms[k], again[k], rtol=1e-5, atol=1e-6), k


# ----------------------------------------------------------------------------- heads and wiring
@pytest.mark.parametrize("model, heads", [("resnet20", ["branch1", "branch2", "net", "fused"]),
                                          ("vgg8", ["branch1", "branch2", "branch3", "net", "fused"])])
def test_every_head_is_evaluated(model, heads):
    m = make(model).eval()
    x, _ = batch(n=2)
    with torch.no_grad():
        out = m.eval_logits(x)
    assert list(out) == heads and all(z.shape == (2, 10) for z in out.values())


def test_fused_map_is_the_fusion_of_branch_maps_and_deepest_map():
    m = make("wrn_16_2").eval()  # WRN: G_L is the head's BN-ReLU of the last stage map
    x, _ = batch(n=2)
    with torch.no_grad():
        out = m.forward_all(x)
        deep = m.net.head.pre(m.net.forward_stages(x)[-1])
        assert torch.allclose(out.deep_map, deep, atol=1e-6)
        assert torch.allclose(out.deep_logits, m.net(x), atol=1e-6)
        masks = [se(g) for se, g in zip(m.fusion.enhance, out.branch_maps + [deep])]
        a_bar = sum(masks) / 3
        assert torch.allclose(out.mean_mask, a_bar, atol=1e-6)
        assert torch.allclose(out.fused_map, sum(g * a_bar for g in out.branch_maps + [deep]) / 3, atol=1e-6)
        assert all(g.shape == deep.shape == (2, 128, 7, 7) for g in out.branch_maps)


def test_fuse_deepest_option():
    m = make(fuse_deepest=False).eval()
    assert len(m.fusion.enhance) == 2
    x, _ = batch(n=2)
    with torch.no_grad():
        out = m.forward_all(x)
        masks = [se(g) for se, g in zip(m.fusion.enhance, out.branch_maps)]
        assert torch.allclose(out.fused_map, sum(g * (sum(masks) / 2) for g in out.branch_maps) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="kernel_size"):
        FMFSDOptions(kernel_size=4).validate()


# ----------------------------------------------------------------------------- gradient flow
@pytest.mark.parametrize("fuse_deepest", [True, False])
def test_gradient_flow_of_each_term(fuse_deepest):
    m = make(fuse_deepest=fuse_deepest)
    x, y = batch()
    terms = m.losses(m.forward_all(x), y)
    params = {n for n, _ in m.named_parameters()}
    lower = ["net.stem.", "net.stages.0.", "net.stages.1.", "branches.0.", "branches.1."]

    ce_net = reached(m, terms["loss_ce_net"])
    assert ce_net <= under(params, "net.") and under(ce_net, "net.stages.2.") and under(ce_net, "net.head.fc.")
    ce_b = reached(m, terms["loss_ce_branches"])
    assert all(under(ce_b, p) for p in lower + ["branch_fcs.0.", "branch_fcs.1."])
    assert not (under(ce_b, "net.stages.2.") or under(ce_b, "net.head.") or under(ce_b, "fusion.")
                or under(ce_b, "fused_fc."))
    ce_f = reached(m, terms["loss_ce_fused"])  # the maps entering the fusion module are not detached
    assert all(under(ce_f, p) for p in lower + ["fusion.", "fused_fc."])
    assert under(ce_f, "fusion.") == under(params, "fusion.")
    assert bool(under(ce_f, "net.stages.2.")) == fuse_deepest
    assert not (under(ce_f, "branch_fcs.") or under(ce_f, "net.head."))
    for name in ("loss_kd_net", "loss_kd_fused"):  # teachers (z_L, z_f) are detached
        got = reached(m, terms[name])
        assert all(under(got, p) for p in lower + ["branch_fcs.0.", "branch_fcs.1."]), name
        assert not (under(got, "net.stages.2.") or under(got, "net.head.") or under(got, "fusion.")
                    or under(got, "fused_fc.")), name
    feat = reached(m, terms["loss_feat"])  # F is detached
    assert all(under(feat, p) for p in lower)
    assert not (under(feat, "branch_fcs.") or under(feat, "net.stages.2.") or under(feat, "net.head.")
                or under(feat, "fusion.") or under(feat, "fused_fc."))
