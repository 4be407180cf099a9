"""Loss terms of the offline methods (kd, fitnet, at, mfkd) against values computed by hand.

Each expected value is computed here independently (plain ``math`` on fixed numbers, or plain torch
arithmetic on the networks' outputs), never by calling the function under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fusionkd.methods import METHODS, MethodContext, Teacher
from fusionkd.methods.at import attention_pair_loss, attention_pairs
from fusionkd.methods.fitnet import hint_loss
from fusionkd.methods.kd import KDOptions, kd_terms
from fusionkd.methods.mfkd import MultiLayerFusion, fast_normalized_weights, feature_loss
from fusionkd.models import StageInfo, create_model


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _hand_kl(s: list[list[float]], t: list[list[float]], T: float) -> float:
    """``T^2 * mean_b sum_k p_t log(p_t / p_s)`` with plain floats."""
    total = 0.0
    for zs, zt in zip(s, t):
        ps, pt = _softmax([v / T for v in zs]), _softmax([v / T for v in zt])
        total += sum(q * math.log(q / p) for p, q in zip(ps, pt))
    return T * T * total / len(s)


def _hand_ce(s: list[list[float]], y: list[int]) -> float:
    return sum(-math.log(_softmax(z)[k]) for z, k in zip(s, y)) / len(s)


def _ctx(teacher_name: str = "resnet32", epochs: int = 10) -> MethodContext:
    torch.manual_seed(0)
    teacher = create_model(teacher_name, num_classes=10, in_chans=1).eval()
    return MethodContext(model="resnet20", num_classes=10, in_chans=1, image_size=28, epochs=epochs,
                         teacher=Teacher(teacher, teacher_name, {}))


def _batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


# ----------------------------------------------------------------------------- kd
S = [[1.0, 2.0, 0.5], [0.0, -1.0, 2.0]]
T_ = [[2.0, 1.0, 0.0], [1.0, 0.0, 3.0]]
Y = [1, 2]


def test_kd_terms_match_hand_computation():
    terms = kd_terms(torch.tensor(S), torch.tensor(T_), torch.tensor(Y), KDOptions())
    assert set(terms) == {"loss_ce", "loss_kd"}
    assert terms["loss_ce"].item() == pytest.approx(0.1 * _hand_ce(S, Y), rel=1e-5)
    assert terms["loss_kd"].item() == pytest.approx(0.9 * _hand_kl(S, T_, 4.0), rel=1e-5)
    # a spot value, so that a wrong hand formula would also be caught: T=1, alpha=1, one sample
    one = kd_terms(torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([0]),
                   KDOptions(ce_weight=1.0, kd_weight=1.0, temperature=1.0))
    # p_t = (3/4, 1/4), p_s = (1/2, 1/2): KL = 3/4 log(3/2) + 1/4 log(1/2); CE = log 2
    assert one["loss_kd"].item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-5)
    assert one["loss_ce"].item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_kd_zero_weight_drops_the_term():
    terms = kd_terms(torch.tensor(S), torch.tensor(T_), torch.tensor(Y), KDOptions(ce_weight=0.0))
    assert set(terms) == {"loss_kd"}


def test_kd_method_step_equals_formula_on_its_networks():
    kd = METHODS.get("kd")(_ctx(), KDOptions())
    kd.train()
    x, y = _batch()
    terms = kd.training_step(x, y, 0)
    with torch.no_grad():
        s = kd.net(x)  # train-mode BN on the same batch: the same logits as inside the step
        t = kd.teacher(x)
    ps_log = torch.log_softmax(s / 4, 1)
    pt = torch.softmax(t / 4, 1)
    kl = (pt * (pt.log() - ps_log)).sum(1).mean() * 16
    ce = -torch.log_softmax(s, 1)[torch.arange(4), y].mean()
    assert terms["loss_kd"].item() == pytest.approx(0.9 * kl.item(), rel=1e-4)
    assert terms["loss_ce"].item() == pytest.approx(0.1 * ce.item(), rel=1e-4)


# ----------------------------------------------------------------------------- fitnet
def test_hint_loss_hand_value():
    s = torch.tensor([[[[1.0, 2.0]], [[0.0, -1.0]]]])  # (1, 2, 1, 2)
    t = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]]])
    # squared differences 1, 0, 1, 4 -> mean 1.5
    assert hint_loss(s, t).item() == pytest.approx(1.5)


def test_fitnet_step_equals_formula_on_its_networks():
    fit = METHODS.get("fitnet")(_ctx(), None)
    fit.train()
    x, y = _batch()
    terms = fit.training_step(x, y, 0)
    assert set(terms) == {"loss_ce", "loss_hint"}
    with torch.no_grad():
        guided = fit.connector(fit.net.forward_stages(x)[1])  # middle stage of 3: index 1
        hint = fit.teacher.forward_stages(x)[1]
        logits = fit.net(x)
    assert guided.shape == hint.shape == (4, 32, 14, 14)
    expected = ((guided - hint) ** 2).sum() / guided.numel()
    assert terms["loss_hint"].item() == pytest.approx(100.0 * expected.item(), rel=1e-4)
    ce = -torch.log_softmax(logits, 1)[torch.arange(4), y].mean()
    assert terms["loss_ce"].item() == pytest.approx(ce.item(), rel=1e-4)


# ----------------------------------------------------------------------------- at
def test_attention_pair_loss_hand_value():
    # student (1, 2, 1, 2): channels [1, 2] and [3, 0] -> energy mean_c f^2 = [5, 2] -> / sqrt(29)
    s = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])
    # teacher (1, 1, 1, 2): [0, 2] -> energy [0, 4] -> [0, 1]
    t = torch.tensor([[[[0.0, 2.0]]]])
    r = math.sqrt(29.0)
    expected = ((5 / r - 0) ** 2 + (2 / r - 1) ** 2) / 2
    assert attention_pair_loss(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_attention_pair_loss_pools_the_larger_energy_map():
    # student 1 x 2 x 4: energy of each 2x2 block = mean of squares; teacher 1 x 1 x 2 (the smaller size)
    s = torch.tensor([[[[1.0, 1.0, 2.0, 0.0], [1.0, 1.0, 0.0, 2.0]]]])  # blocks: mean sq 1 and 2
    t = torch.tensor([[[[3.0, 0.0]]]])  # energy [9, 0] -> [1, 0]
    a = [1 / math.sqrt(5), 2 / math.sqrt(5)]
    expected = ((a[0] - 1) ** 2 + (a[1] - 0) ** 2) / 2
    assert attention_pair_loss(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_at_step_is_half_beta_times_sum_over_all_stages():
    at = METHODS.get("at")(_ctx(), None)
    at.train()
    x, y = _batch()
    terms = at.training_step(x, y, 0)
    with torch.no_grad():
        s_maps, t_maps = at.net.forward_stages(x), at.teacher.forward_stages(x)
    total = 0.0
    for fs, ft in zip(s_maps, t_maps):  # 3 stages each: paired by index
        qs = fs.pow(2).mean(1).flatten(1)
        qt = ft.pow(2).mean(1).flatten(1)
        qs = qs / qs.norm(dim=1, keepdim=True)
        qt = qt / qt.norm(dim=1, keepdim=True)
        total += ((qs - qt) ** 2).mean().item()
    assert terms["loss_at"].item() == pytest.approx(1000.0 / 2 * total, rel=1e-4)


def test_attention_pairs_by_index_or_by_resolution():
    def info(strides: list[int]) -> list[StageInfo]:
        return [StageInfo(f"stages.{i}", 8, s) for i, s in enumerate(strides)]

    assert attention_pairs(info([1, 2, 4]), info([1, 2, 4])) == [(0, 0), (1, 1), (2, 2)]
    assert attention_pairs(info([1, 2, 4]), info([1, 2, 4, 8])) == [(0, 0), (1, 1), (2, 2)]
    assert attention_pairs(info([2, 4, 8, 16]), info([1, 2, 4])) == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match="no student/teacher stages of the same resolution"):
        attention_pairs(info([3, 6]), info([1, 2, 4]))


# ----------------------------------------------------------------------------- mfkd
def test_fast_normalized_weights_hand_value():
    w = fast_normalized_weights(torch.tensor([1.0, -1.0, 3.0]))
    assert w.tolist() == pytest.approx([1 / (4 + 1e-6), 0.0, 3 / (4 + 1e-6)], rel=1e-7)


def test_feature_loss_hand_value():
    s = torch.tensor([[[[1.0, -1.0], [0.0, 2.0]]]])
    t = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])
    assert feature_loss(s, t).item() == pytest.approx((1 + 4 + 0 + 4) / 4)


def _identity_fusion(fusion: str) -> MultiLayerFusion:
    """Two taps of 1 channel (a 2x2 shallow one, a 1x1 deep one); 1x1 convs set to 1, BN in eval mode."""
    m = MultiLayerFusion([StageInfo("a", 1, 1), StageInfo("b", 1, 2)], num_classes=2, align="pool", fusion=fusion)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 4:
                p.fill_(1.0)
        m.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        m.fc.bias.zero_()
    return m.eval()


def test_weighted_fusion_hand_value():
    m = _identity_fusion("weighted")
    with torch.no_grad():
        m.fusion_weights.copy_(torch.tensor([1.0, 3.0]))
    a = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]])  # pooled to 1x1: 4
    b = torch.tensor([[[[-2.0]]]])
    bn = 1 / math.sqrt(1 + 1e-5)  # eval BN with running mean 0, var 1
    w0, w1 = 1 / (4 + 1e-6), 3 / (4 + 1e-6)
    fused = max(0.0, w0 * 4 * bn + w1 * (-2) * bn)
    out = m([a, b])
    assert out.shape == (1, 1, 1, 1)
    assert out.item() == pytest.approx(fused, rel=1e-5)
    assert m.classify(out).tolist()[0] == pytest.approx([fused, -fused], rel=1e-5)


def test_concat_fusion_hand_value():
    m = _identity_fusion("concat")
    a = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]])
    b = torch.tensor([[[[-2.0]]]])
    bn = 1 / math.sqrt(1 + 1e-5)
    # aligned: 4*bn and -2*bn; 1x1 conv of ones sums them; BN; ReLU
    expected = max(0.0, (4 * bn - 2 * bn) * bn)
    assert m([a, b]).item() == pytest.approx(expected, rel=1e-5)


def test_mfkd_student_stage_terms_equal_formula_on_its_networks():
    ctx = _ctx(epochs=10)
    mf = METHODS.get("mfkd")(ctx, None)
    mf.on_epoch_start(1)  # fusion stage is epoch 0 (10 % of 10): the student stage starts at 1
    mf.train()
    x, y = _batch()
    terms = mf.training_step(x, y, 1)
    assert terms["loss_fusion_ce"].item() == 0.0
    with torch.no_grad():
        t_maps = mf.teacher.forward_stages(x)
        t_logits = mf.teacher.forward_head(t_maps[-1])
        fused = mf.fusion([t_maps[0], t_maps[1], t_maps[2]])
        s_maps = mf.net.forward_stages(x)
        s_logits = mf.net.forward_head(s_maps[-1])
        conn = mf.connector(s_maps[-1])
    assert fused.shape == conn.shape == (4, 64, 7, 7)
    pt = torch.softmax(t_logits / 4, 1)
    kl = (pt * (pt.log() - torch.log_softmax(s_logits / 4, 1))).sum(1).mean() * 16
    ce = -torch.log_softmax(s_logits, 1)[torch.arange(4), y].mean()
    mse = ((conn - fused) ** 2).sum() / conn.numel()
    assert terms["loss_ce"].item() == pytest.approx(ce.item(), rel=1e-4)
    assert terms["loss_kd"].item() == pytest.approx(kl.item(), rel=1e-4)
    assert terms["loss_feat"].item() == pytest.approx(50.0 * mse.item(), rel=1e-4)


def test_mfkd_fusion_stage_term_is_ce_of_the_fusion_head():
    mf = METHODS.get("mfkd")(_ctx(epochs=10), None)
    mf.on_epoch_start(0)
    mf.train()
    x, y = _batch()
    terms = mf.training_step(x, y, 0)
    assert terms["loss_feat"].item() == 0.0
    with torch.no_grad():
        t_maps = mf.teacher.forward_stages(x)
        logits = mf.fusion.classify(mf.fusion(t_maps))  # train-mode BN, same batch: same logits
    ce = -torch.log_softmax(logits, 1)[torch.arange(4), y].mean()
    assert terms["loss_fusion_ce"].item() == pytest.approx(ce.item(), rel=1e-4)
    assert terms["loss_fusion_ce"].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-4)
