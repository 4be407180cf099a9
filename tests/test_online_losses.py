"""Loss terms, ramp-up and modules of the online family (dml, one, ffl, ffl_s, mfef) against values
computed by hand, in plain Python/torch arithmetic independent of the library's functions."""

from __future__ import annotations

import math

import pytest
import torch

from fusionkd.methods import MethodContext
from fusionkd.methods.dml import DML, dml_loss, mutual_kl
from fusionkd.methods.ffl import FFL
from fusionkd.methods.fusion import FusionModule, ffl_rampup_epochs, fusion_mutual_loss
from fusionkd.methods.mfef import DualAttention, MultiScaleExtractor
from fusionkd.methods.one import BranchGate, gated_logits, one_loss

# three "peers" of logits over K = 3 classes, batch of 2, and the labels
Z1 = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
Z2 = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
Z3 = [[0.5, 0.5, -1.0], [2.0, -2.0, 0.0]]
LABELS = [1, 2]


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ------------------------------------------------------------------ plain-Python references
def softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    e = [math.exp(v / temperature) for v in row]
    s = sum(e)
    return [v / s for v in e]


def ce(rows: list[list[float]], labels: list[int]) -> float:
    return sum(-math.log(softmax(r)[y]) for r, y in zip(rows, labels)) / len(rows)


def kl(student: list[list[float]], teacher: list[list[float]], temperature: float) -> float:
    """T^2 KL(softmax(t/T) || softmax(s/T)), batch mean."""
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        p_s, p_t = softmax(s_row, temperature), softmax(t_row, temperature)
        total += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
    return temperature**2 * total / len(student)


def mean_rows(*zs: list[list[float]]) -> list[list[float]]:
    return [[sum(z[i][j] for z in zs) / len(zs) for j in range(len(zs[0][0]))] for i in range(len(zs[0]))]


def approx(x: torch.Tensor, expected: float) -> None:
    assert float(x) == pytest.approx(expected, rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------ DML
def test_dml_loss_two_peers_by_hand():
    terms = dml_loss([t(Z1), t(Z2)], torch.tensor(LABELS))
    assert set(terms) == {"loss_ce", "loss_kl"}
    approx(terms["loss_ce"], ce(Z1, LABELS) + ce(Z2, LABELS))
    # peer 1 learns from peer 2 and peer 2 from peer 1; 1/(m-1) = 1
    approx(terms["loss_kl"], kl(Z1, Z2, 1.0) + kl(Z2, Z1, 1.0))


def test_dml_loss_three_peers_mean_over_the_others():
    zs = [Z1, Z2, Z3]
    expected = sum(kl(zs[k], zs[j], 1.0) for k in range(3) for j in range(3) if j != k) / 2
    approx(mutual_kl([t(z) for z in zs]), expected)
    approx(dml_loss([t(z) for z in zs], torch.tensor(LABELS))["loss_ce"], sum(ce(z, LABELS) for z in zs))
    with pytest.raises(ValueError, match="at least 2"):
        mutual_kl([t(Z1)])


# ------------------------------------------------------------------ ONE
def test_one_gated_teacher_and_loss_by_hand():
    gate = [[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]]
    zs = [Z1, Z2, Z3]
    teacher = [[sum(gate[i][k] * zs[k][i][j] for k in range(3)) for j in range(3)] for i in range(2)]
    z_t = gated_logits([t(z) for z in zs], t(gate))
    assert torch.allclose(z_t, t(teacher), atol=1e-6)
    terms = one_loss([t(z) for z in zs], z_t, torch.tensor(LABELS), weight=0.5, temperature=3.0)
    assert set(terms) == {"loss_ce", "loss_ce_gate", "loss_kd"}
    approx(terms["loss_ce"], sum(ce(z, LABELS) for z in zs))
    approx(terms["loss_ce_gate"], ce(teacher, LABELS))
    approx(terms["loss_kd"], 0.5 * sum(kl(z, teacher, 3.0) for z in zs))


def test_one_gate_by_hand():
    """g = softmax(ReLU(BN(FC(GAP(S))))) with a known FC and BN (eval mode, set running statistics)."""
    gate = BranchGate(in_channels=2, branches=3)
    with torch.no_grad():
        gate.fc.weight.copy_(t([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
        gate.fc.bias.copy_(torch.tensor([0.0, 0.5, 0.0]))
        gate.bn.running_mean.copy_(torch.tensor([0.5, 0.0, -1.0]))
        gate.bn.running_var.copy_(torch.tensor([4.0, 1.0, 1.0]))
        gate.bn.weight.copy_(torch.tensor([2.0, 1.0, 1.0]))
        gate.bn.bias.copy_(torch.tensor([0.0, 0.0, -0.5]))
    gate.eval()
    shared = torch.zeros(1, 2, 2, 2)
    shared[0, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # channel means 2.5 and 0.5
    shared[0, 1] = 0.5
    eps = gate.bn.eps
    fc = [2.5, 0.5 + 0.5, 2.5 - 0.5]
    bn = [
        2.0 * (fc[0] - 0.5) / math.sqrt(4.0 + eps),
        (fc[1] - 0.0) / math.sqrt(1.0 + eps),
        (fc[2] + 1.0) / math.sqrt(1.0 + eps) - 0.5,
    ]
    expected = softmax([max(v, 0.0) for v in bn])
    got = gate(shared)
    assert torch.allclose(got, t([expected]), atol=1e-6)


# ------------------------------------------------------------------ FFL / FFL-S / MFEF
def test_ffl_loss_by_hand():
    zs, z_f = [Z1, Z2], Z3
    terms = fusion_mutual_loss([t(z) for z in zs], t(z_f), torch.tensor(LABELS), weight=0.25, temperature=3.0)
    assert set(terms) == {"loss_ce", "loss_ce_fused", "loss_kd_sub", "loss_kd_fused"}
    approx(terms["loss_ce"], ce(Z1, LABELS) + ce(Z2, LABELS))
    approx(terms["loss_ce_fused"], ce(z_f, LABELS))
    approx(terms["loss_kd_sub"], 0.25 * (kl(Z1, z_f, 3.0) + kl(Z2, z_f, 3.0)))
    # the ensemble is the mean of the LOGITS (not of the probabilities)
    approx(terms["loss_kd_fused"], 0.25 * kl(z_f, mean_rows(Z1, Z2), 3.0))


def test_rampup_start_middle_end():
    assert ffl_rampup_epochs(300, None) == 80.0
    assert ffl_rampup_epochs(30, None) == 8.0  # round(80/300 * 30) = round(8.0)
    assert ffl_rampup_epochs(10, None) == 3.0  # round(2.67)
    assert ffl_rampup_epochs(10, 5) == 5.0
    ctx = MethodContext(model="resnet20", num_classes=10, in_chans=1, image_size=16, epochs=30)
    torch.manual_seed(0)
    method = FFL(ctx)
    assert method.rampup_weight(0) == pytest.approx(math.exp(-5.0))  # 0.0067
    assert method.rampup_weight(4) == pytest.approx(math.exp(-5.0 * 0.5**2))  # middle: 0.2865
    assert method.rampup_weight(8) == pytest.approx(1.0)
    assert method.rampup_weight(29) == pytest.approx(1.0)
    no_ramp = FFL(ctx, FFL.Options(rampup_epochs=0.0))
    assert no_ramp.rampup_weight(0) == 1.0


def test_fusion_module_by_hand():
    """With identity-like weights and eval-mode BN of known statistics, z_f follows by hand:
    depthwise centre taps a_c, BN1 identity, ReLU, 1x1 conv summing pairs, BN2 identity, ReLU, GAP, FC."""
    fusion = FusionModule([2, 2], num_classes=2, out_channels=2)
    with torch.no_grad():
        fusion.depthwise.weight.zero_()
        fusion.depthwise.weight[:, 0, 1, 1] = torch.tensor([1.0, -1.0, 2.0, 0.5])
        fusion.pointwise.weight.zero_()
        fusion.pointwise.weight[0, 0, 0, 0] = fusion.pointwise.weight[0, 2, 0, 0] = 1.0
        fusion.pointwise.weight[1, 1, 0, 0] = fusion.pointwise.weight[1, 3, 0, 0] = 1.0
        fusion.fc.weight.copy_(t([[1.0, 0.0], [1.0, -1.0]]))
        fusion.fc.bias.copy_(torch.tensor([0.0, 0.1]))
    fusion.eval()
    a = torch.tensor([[[[1.0, -2.0], [3.0, 0.0]], [[1.0, 1.0], [-1.0, -1.0]]]])  # (1, 2, 2, 2)
    b = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]], [[-2.0, 4.0], [0.0, 2.0]]]])
    s = 1.0 / math.sqrt(1.0 + fusion.bn1.eps)  # an eval BN with fresh statistics scales by 1/sqrt(1+eps)
    relu = lambda v: max(v, 0.0)  # noqa: E731
    ch0 = [relu(s * 1.0 * v) + relu(s * 2.0 * w) for v, w in zip([1, -2, 3, 0], [0.5] * 4)]
    ch1 = [relu(s * -1.0 * v) + relu(s * 0.5 * w) for v, w in zip([1, 1, -1, -1], [-2, 4, 0, 2])]
    pooled = [sum(relu(s * v) for v in ch0) / 4, sum(relu(s * v) for v in ch1) / 4]
    expected = [pooled[0], pooled[0] - pooled[1] + 0.1]
    assert torch.allclose(fusion([a, b]), t([expected]), atol=1e-5)
    with pytest.raises(ValueError, match="one H x W"):
        fusion([a, torch.zeros(1, 2, 3, 3)])


def _identity_centre(conv: torch.nn.Conv2d) -> None:
    """Make a "same"-padded conv the identity: centre tap 1 on the diagonal."""
    with torch.no_grad():
        conv.weight.zero_()
        k = conv.kernel_size[0] // 2
        for i in range(conv.out_channels):
            conv.weight[i, i, k, k] = 1.0


def test_multiscale_hierarchical_by_hand():
    """Convs = identity and eval BN (scale s = 1/sqrt(1+eps)): y1 = x1, y_j = ReLU(s (x_j + y_{j-1})),
    out = ReLU(s cat(y) + x)."""
    torch.manual_seed(0)
    block = MultiScaleExtractor(8, scales=4, mode="hierarchical").eval()
    for seq in block.convs:
        _identity_centre(seq[0])
    _identity_centre(block.fuse)
    x = torch.randn(2, 8, 3, 3)
    s = 1.0 / math.sqrt(1.0 + block.bn.eps)
    g = list(x.split(2, dim=1))
    ys = [g[0]]
    for j in range(1, 4):
        ys.append(torch.clamp(s * (g[j] + ys[-1]), min=0))
    expected = torch.clamp(s * torch.cat(ys, 1) + x, min=0)
    assert torch.allclose(block(x), expected, atol=1e-6)
    # the hierarchy: group 1 reaches every later group, the last group reaches no earlier one
    x2 = x.clone()
    x2[:, 6:8] += 1.0
    diff = (block(x2) - block(x)).abs().sum(dim=(0, 2, 3))
    assert diff[:6].max() == 0 and diff[6:].max() > 0


def test_multiscale_pyramid_by_hand_and_kernels():
    torch.manual_seed(0)
    block = MultiScaleExtractor(8, scales=4, mode="pyramid").eval()
    assert [seq[0].kernel_size[0] for seq in block.convs] == [3, 5, 7, 9]
    for seq in block.convs:
        _identity_centre(seq[0])
    _identity_centre(block.fuse)
    x = torch.randn(2, 8, 5, 5)
    s = 1.0 / math.sqrt(1.0 + block.bn.eps)
    ys = torch.clamp(s * x, min=0)  # every group: ReLU(BN(conv(x_j))) with no hierarchy
    assert torch.allclose(block(x), torch.clamp(s * ys + x, min=0), atol=1e-6)


def test_multiscale_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="scales=4 equal channel groups"):
        MultiScaleExtractor(10, scales=4)
    with pytest.raises(ValueError, match="mode"):
        MultiScaleExtractor(8, mode="pyramids")


def test_dual_attention_by_hand():
    """Known MLP weights and a centre-only spatial kernel make both masks computable by hand."""
    att = DualAttention(channels=4, reduction=16)  # hidden = max(4 // 16, 4) = 4
    assert att.mlp[0].out_channels == 4
    w1 = t([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    w2 = t([[1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.2]])
    with torch.no_grad():
        att.mlp[0].weight.copy_(w1.view(4, 4, 1, 1))
        att.mlp[2].weight.copy_(w2.view(4, 4, 1, 1))
        att.spatial.weight.zero_()
        att.spatial.weight[0, 0, 3, 3] = 0.7  # mean over channels
        att.spatial.weight[0, 1, 3, 3] = -0.3  # max over channels
    torch.manual_seed(1)
    x = torch.randn(1, 4, 3, 3)
    flat = x[0].reshape(4, 9)

    def mlp(v: list[float]) -> list[float]:
        h = [max(sum(w1[i][j].item() * v[j] for j in range(4)), 0.0) for i in range(4)]
        return [sum(w2[i][j].item() * h[j] for j in range(4)) for i in range(4)]

    avg = [float(flat[c].mean()) for c in range(4)]
    mx = [float(flat[c].max()) for c in range(4)]
    mc = [1 / (1 + math.exp(-(a + b))) for a, b in zip(mlp(avg), mlp(mx))]
    x1 = [[float(flat[c, p]) * mc[c] for p in range(9)] for c in range(4)]
    out = torch.zeros(1, 4, 3, 3)
    for p in range(9):
        col = [x1[c][p] for c in range(4)]
        ms = 1 / (1 + math.exp(-(0.7 * sum(col) / 4 - 0.3 * max(col))))
        for c in range(4):
            out[0, c, p // 3, p % 3] = col[c] * ms
    assert torch.allclose(att(x), out, atol=1e-5)


def test_options_validate():
    with pytest.raises(ValueError, match="peers"):
        DML.Options(peers=1).validate()
    with pytest.raises(ValueError, match="temperature"):
        FFL.Options(temperature=0.0).validate()
