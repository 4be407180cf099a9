"""BYOT (Zhang et al., ICCV 2019): branch shapes built from stage_info, the loss against hand-computed
values, and which parameters each loss term trains."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from gradflow import batch, build_method, reached, under
from handmath import ce_row, kl_t

from fusionkd.methods.byot import BYOT, BottleneckBranch, BYOTOptions, BYOTOutputs, stage_sizes
from fusionkd.models import create_model


def make(model: str = "resnet20", size: int = 28, in_chans: int = 1, **options) -> BYOT:
    return build_method(BYOT, model, size, in_chans, **options)


# ----------------------------------------------------------------------------- branches
@pytest.mark.parametrize(
    "model, size, in_chans, kernels",
    [("resnet20", 28, 1, [4, 2]), ("resnet20", 32, 3, [4, 2]), ("resnet18", 28, 1, [7, 3, 1]),
     ("resnet18", 32, 3, [8, 4, 2]), ("wrn_16_2", 28, 1, [4, 2])],
)
def test_branches_reach_the_deepest_shape(model, size, in_chans, kernels):
    m = make(model, size, in_chans).eval()
    assert [b.kernel for b in m.branches] == kernels
    x, _ = batch(size, in_chans, n=2)
    with torch.no_grad():
        out = m.forward_all(x)
    d = m.net.num_features
    assert len(out.branch_logits) == m.net.num_stages - 1
    assert all(f.shape == (2, d) for f in out.branch_features) and out.deep_features.shape == (2, d)
    assert all(z.shape == (2, 10) for z in out.branch_logits)


def test_stage_sizes_round_up():
    info = create_model("resnet18", num_classes=10, in_chans=1).stage_info
    assert stage_sizes(info, 28) == [28, 14, 7, 4] and stage_sizes(info, 32) == [32, 16, 8, 4]


def test_bottleneck_branch_layout_and_adaptive_fallback():
    b = BottleneckBranch(16, 64, in_size=14, out_size=4)  # 14 -> 4: k = 3 gives floor(14/3) = 4 directly
    assert b.kernel == 3 and b.reduce[0].out_channels == 16 and b.expand[0].out_channels == 64
    assert b(torch.randn(2, 16, 14, 14), (4, 4)).shape == (2, 64, 4, 4)
    b = BottleneckBranch(16, 64, in_size=7, out_size=4)  # 7 -> 4: k = 1, then adaptive pooling to 4x4
    assert b.kernel == 1 and b(torch.randn(2, 16, 7, 7), (4, 4)).shape == (2, 64, 4, 4)


def test_heads_and_deepest_head_is_the_backbone():
    m = make("wrn_16_2").eval()  # WRN: the head has a final BN-ReLU ("pre"), which the deep feature includes
    x, _ = batch(n=3)
    with torch.no_grad():
        heads = m.eval_logits(x)
        assert list(heads) == ["branch1", "branch2", "net"]
        assert torch.allclose(heads["net"], m.net(x), atol=1e-6)
        out = m.forward_all(x)
        assert torch.allclose(out.deep_features, m.net.head.pooled(m.net.forward_stages(x)[-1]), atol=1e-6)


# ----------------------------------------------------------------------------- loss
def test_loss_by_hand():
    """The paper's Eq. 1: (1 - alpha) on every CE including the deepest, a plain KL (no T^2 factor)."""
    alpha, lam, temp = 0.25, 0.5, 3.0
    z1, z2, zl = [0.5, -1.0, 2.0], [1.0, 1.0, 0.0], [3.0, 0.0, -1.0]
    f1, f2, fl = [1.0, 2.0], [0.0, -1.0], [0.5, 0.5]
    label = 2

    def kl(t_logits, s_logits):  # KL(softmax(t/T) || softmax(s/T)), written out
        pt = [math.exp(v / temp) for v in t_logits]
        ps = [math.exp(v / temp) for v in s_logits]
        pt, ps = [v / sum(pt) for v in pt], [v / sum(ps) for v in ps]
        return sum(a * math.log(a / b) for a, b in zip(pt, ps))

    assert kl(zl, z1) == pytest.approx(kl_t(zl, z1, temp) / temp**2, rel=1e-12)

    ce = {k: ce_row(z, label) for k, z in {"1": z1, "2": z2, "L": zl}.items()}
    sq = sum((a - b) ** 2 for a, b in zip(f1, fl)) + sum((a - b) ** 2 for a, b in zip(f2, fl))  # 2.5 + 2.5
    assert sq == pytest.approx(5.0)
    m = make(alpha=alpha, feature_weight=lam, temperature=temp)
    t = torch.tensor
    out = BYOTOutputs(branch_logits=[t([z1]), t([z2])], branch_features=[t([f1]), t([f2])],
                      deep_logits=t([zl]), deep_features=t([fl]))
    terms = m.losses(out, t([label]))
    assert terms["loss_ce_net"].item() == pytest.approx((1 - alpha) * ce["L"], rel=1e-6)
    assert terms["loss_ce_branches"].item() == pytest.approx((1 - alpha) * (ce["1"] + ce["2"]), rel=1e-6)
    assert terms["loss_kd"].item() == pytest.approx(alpha * (kl(zl, z1) + kl(zl, z2)), rel=1e-5)
    assert terms["loss_feat"].item() == pytest.approx(lam * 5.0, rel=1e-6)
    # batch of two identical rows: every term is a batch mean, so nothing changes
    two = BYOTOutputs(branch_logits=[t([z1, z1]), t([z2, z2])], branch_features=[t([f1, f1]), t([f2, f2])],
                      deep_logits=t([zl, zl]), deep_features=t([fl, fl]))
    terms2 = m.losses(two, t([label, label]))
    assert all(terms2[k].item() == pytest.approx(terms[k].item(), rel=1e-6) for k in terms)
    # the whole loss as one number, computed from the values above by hand (pins the definition)
    total = sum(v.item() for v in terms.values())
    assert total == pytest.approx(0.75 * (ce["L"] + ce["1"] + ce["2"]) + 0.25 * (kl(zl, z1) + kl(zl, z2))
                                  + 0.5 * 5.0, rel=1e-6)


def test_loss_variants_of_the_released_codes():
    """``t_squared`` (third-party re-implementation) scales the soft-label term by T^2 = 9;
    ``deep_ce_weight=1`` (the authors' journal-version release) gives the deepest CE weight 1."""
    t = torch.tensor
    out = BYOTOutputs(branch_logits=[t([[0.5, -1.0, 2.0]]), t([[1.0, 1.0, 0.0]])],
                      branch_features=[t([[1.0, 2.0]]), t([[0.0, -1.0]])],
                      deep_logits=t([[3.0, 0.0, -1.0]]), deep_features=t([[0.5, 0.5]]))
    labels = t([2])
    paper = make(alpha=0.3, temperature=3.0).losses(out, labels)
    t2 = make(alpha=0.3, temperature=3.0, t_squared=True).losses(out, labels)
    release = make(alpha=0.3, temperature=3.0, deep_ce_weight=1.0).losses(out, labels)
    assert t2["loss_kd"].item() == pytest.approx(9 * paper["loss_kd"].item(), rel=1e-6)
    assert release["loss_ce_net"].item() == pytest.approx(paper["loss_ce_net"].item() / 0.7, rel=1e-6)
    assert release["loss_ce_net"].item() == pytest.approx(ce_row([3.0, 0.0, -1.0], 2), rel=1e-6)
    for bad in (0.0, -1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="deep_ce_weight"):
            BYOTOptions(deep_ce_weight=bad).validate()


def test_default_options_are_the_spec():
    o = BYOTOptions()
    assert (o.alpha, o.feature_weight, o.temperature) == (0.1, 1e-6, 3.0)
    assert (o.deep_ce_weight, o.t_squared) == (None, False)  # the paper's Eq. 1
    with pytest.raises(ValueError, match="alpha"):
        BYOTOptions(alpha=1.5).validate()


def test_training_step_is_the_loss_of_one_forward():
    m = make()
    x, y = batch()
    terms = m.training_step(x, y, 0)
    again = m.losses(m.forward_all(x), y)
    assert set(terms) == {"loss_ce_net", "loss_ce_branches", "loss_kd", "loss_feat"}
    for k in terms:
        assert torch.allclose(terms[k], again[k], rtol=1e-5, atol=1e-7), k
    # branch logits are FC(GAP(branch map)) of the stage maps
    m.eval()
    with torch.no_grad():
        maps = m.net.forward_stages(x)
        g = m.branches[0](maps[0], tuple(maps[-1].shape[-2:]))
        z = m.branch_fcs[0](F.adaptive_avg_pool2d(g, 1).flatten(1))
        assert torch.allclose(m.eval_logits(x)["branch1"], z, atol=1e-6)


# ----------------------------------------------------------------------------- gradient flow
def test_gradient_flow_of_each_term():
    m = make(alpha=0.5, feature_weight=1.0)
    x, y = batch()
    terms = m.losses(m.forward_all(x), y)
    params = {n for n, _ in m.named_parameters()}
    net = under(params, "net.")
    lower = ["net.stem.", "net.stages.0.", "net.stages.1."]  # stages that feed a branch

    ce_net = reached(m, terms["loss_ce_net"])
    assert ce_net <= net and under(ce_net, "net.stages.2.") and under(ce_net, "net.head.fc.")
    for name in ("loss_ce_branches", "loss_kd"):
        got = reached(m, terms[name])
        assert all(under(got, p) for p in lower + ["branches.0.", "branches.1.", "branch_fcs.0.", "branch_fcs.1."])
        assert not under(got, "net.stages.2.") and not under(got, "net.head.")  # the deepest head is the teacher
    feat = reached(m, terms["loss_feat"])
    assert all(under(feat, p) for p in lower + ["branches.0.", "branches.1."])
    assert not under(feat, "branch_fcs.") and not under(feat, "net.stages.2.") and not under(feat, "net.head.")


def test_detach_branches_ablation_keeps_branch_losses_off_the_backbone():
    m = make(detach_branches=True)
    x, y = batch()
    terms = m.training_step(x, y, 0)
    assert under(reached(m, terms["loss_ce_branches"]), "net.") == set()
    assert under(reached(m, terms["loss_ce_branches"]), "branches.")
    assert under(reached(m, terms["loss_ce_net"]), "net.stages.0")
