"""Each online method's ``training_step`` against its formula (docs/methods/online.md), recomputed here in plain
Python (tests/handmath.py) from the logits of the method's own networks: which terms, their weights, the
ramp-up weight ``w(t) = exp(-5 (1 - min(t, R)/R)^2)`` at the start, middle and end of the ramp, ONE's gate and
MFEF's ``peer_kl`` weighting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from handmath import ce_row, kl_t

from fusionkd.methods import METHODS, Method, MethodContext

EPOCHS = 30  # FFL's default ramp-up: R = round(80/300 * 30) = 8 epochs


def build(name: str, **options) -> Method:
    torch.manual_seed(0)
    ctx = MethodContext(model="resnet20", num_classes=5, in_chans=1, image_size=16, epochs=EPOCHS)
    cls = METHODS.get(name)
    m = cls(ctx, cls.Options(**options))
    m.train()
    return m


def batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 5, (n,), generator=g)


def rows(z: torch.Tensor) -> list[list[float]]:
    return z.detach().double().tolist()


def ce(z: list[list[float]], labels: list[int]) -> float:
    return sum(ce_row(r, y) for r, y in zip(z, labels)) / len(z)


def kl(teacher: list[list[float]], student: list[list[float]], t: float) -> float:
    """T^2 KL(softmax(teacher/T) || softmax(student/T)), batch mean."""
    return sum(kl_t(a, b, t) for a, b in zip(teacher, student)) / len(student)


def mean_rows(zs: list[list[list[float]]]) -> list[list[float]]:
    return [[sum(z[i][j] for z in zs) / len(zs) for j in range(len(zs[0][0]))] for i in range(len(zs[0]))]


def ramp(t: float, r: float) -> float:
    return 1.0 if r <= 0 else math.exp(-5.0 * (1.0 - min(t, r) / r) ** 2)


def check(terms: dict[str, torch.Tensor], expected: dict[str, float]) -> None:
    assert set(terms) == set(expected)
    for k, v in expected.items():
        assert float(terms[k].detach()) == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_ramp_weights_by_hand():
    assert ramp(0, 8) == pytest.approx(0.006737947)  # exp(-5)
    assert ramp(4, 8) == pytest.approx(0.286504797)  # exp(-5/4)
    assert ramp(8, 8) == ramp(20, 8) == 1.0


def test_dml_step_three_peers():
    m = build("dml", peers=3)
    x, y = batch()
    terms = m.training_step(x, y, 0)
    zs = [rows(net(x)) for net in m.peers.members]  # each peer on its own
    labels = y.tolist()
    kl_sum = sum(kl(zs[j], zs[k], 1.0) for k in range(3) for j in range(3) if j != k) / 2  # 1/(m-1)
    check(terms, {"loss_ce": sum(ce(z, labels) for z in zs), "loss_kl": kl_sum})
    check(m.training_step(x, y, 25), {"loss_ce": sum(ce(z, labels) for z in zs), "loss_kl": kl_sum})  # no ramp


@pytest.mark.parametrize("name", ["ffl", "ffl_s"])
@pytest.mark.parametrize("epoch", [0, 4, 8, 20])
def test_ffl_step_follows_the_formula_and_the_ramp(name, epoch):
    m = build(name)
    assert m.rampup_length == 8.0
    x, y = batch()
    terms = m.training_step(x, y, epoch)
    out = m.peers(x, m.post)
    zs, zf = [rows(z) for z in out.logits], rows(m.fusion(out.processed))
    labels, w = y.tolist(), ramp(epoch, 8)
    check(terms, {
        "loss_ce": sum(ce(z, labels) for z in zs),
        "loss_ce_fused": ce(zf, labels),
        "loss_kd_sub": w * sum(kl(zf, z, 3.0) for z in zs),  # the fused classifier teaches each peer
        "loss_kd_fused": w * kl(mean_rows(zs), zf, 3.0),  # the mean of the peers' logits teaches it
    })


def test_ffl_ramp_option_and_no_ramp():
    x, y = batch()
    for r, epoch in [(2.0, 1), (0.0, 0)]:  # rampup_epochs=R given; 0 = no ramp-up (w = 1 from the start)
        m = build("ffl", rampup_epochs=r)
        terms = m.training_step(x, y, epoch)
        out = m.peers(x, m.post)
        zs, zf = [rows(z) for z in out.logits], rows(m.fusion(out.processed))
        w = ramp(epoch, r)
        assert w == (1.0 if r == 0 else pytest.approx(math.exp(-5 / 4)))
        assert float(terms["loss_kd_sub"].detach()) == pytest.approx(w * sum(kl(zf, z, 3.0) for z in zs), rel=1e-5)
        assert float(terms["loss_kd_fused"].detach()) == pytest.approx(w * kl(mean_rows(zs), zf, 3.0), rel=1e-5)


@pytest.mark.parametrize("peer_kl", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("epoch", [0, 4, 12])
def test_mfef_step_with_peer_kl_weighting(peer_kl, epoch):
    m = build("mfef", students=3, peer_kl=peer_kl)
    x, y = batch()
    terms = m.training_step(x, y, epoch)
    out = m.peers(x, m.post)
    zs, zf = [rows(z) for z in out.logits], rows(m.fusion(out.processed))
    labels, w = y.tolist(), ramp(epoch, 8)
    expected = {
        "loss_ce": sum(ce(z, labels) for z in zs),
        "loss_ce_fused": ce(zf, labels),
        "loss_kd_sub": w * sum(kl(zf, z, 3.0) for z in zs),
        "loss_kd_fused": w * kl(mean_rows(zs), zf, 3.0),
    }
    if peer_kl > 0:  # DML's terms between the students, T = 1, not ramped; absent when off
        expected["loss_kl_peer"] = peer_kl * sum(kl(zs[j], zs[k], 1.0) for k in range(3) for j in range(3)
                                                 if j != k) / 2
    check(terms, expected)


@pytest.mark.parametrize("rampup, epoch", [(0.0, 0), (10.0, 0), (10.0, 5), (10.0, 10), (10.0, 40)])
def test_one_step_gate_teacher_and_ramp(rampup, epoch):
    m = build("one", branches=3, rampup_epochs=rampup)
    x, y = batch()
    terms = m.training_step(x, y, epoch)
    out = m.peers(x)
    zs = [rows(z) for z in out.logits]
    # the gate by hand, in training mode: GAP -> FC -> BatchNorm1d with the batch's statistics -> ReLU -> softmax
    pooled = out.shared.mean((2, 3)).double()
    h = pooled @ m.gate.fc.weight.double().T + m.gate.fc.bias.double()
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + m.gate.bn.eps)
    h = h * m.gate.bn.weight.double() + m.gate.bn.bias.double()
    g = F.softmax(h.clamp(min=0), dim=1).tolist()
    zt = [[sum(g[i][k] * zs[k][i][j] for k in range(3)) for j in range(5)] for i in range(len(g))]
    labels, w = y.tolist(), ramp(epoch, rampup)
    check(terms, {
        "loss_ce": sum(ce(z, labels) for z in zs),
        "loss_ce_gate": ce(zt, labels),
        "loss_kd": w * sum(kl(zt, z, 3.0) for z in zs),
    })
