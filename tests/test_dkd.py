"""``dkd`` (Decoupled Knowledge Distillation, Zhao et al., CVPR 2022): the loss against plain-Python hand
computation and against a re-implementation of the authors' masking formula (mdistiller), the warm-up, what
one step trains, option checks, and a tiny end-to-end run through the CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_offline_engine import assert_option_refused, assert_teacher_unchanged, spy_teacher, two_step_cli

from fusionkd.engine.checkpoint import load_checkpoint
from fusionkd.engine.config import build_options, resolve_config
from fusionkd.methods import METHODS, MethodContext, Teacher
from fusionkd.methods._offline import warmup_factor
from fusionkd.methods.dkd import DKDOptions, dkd_loss, dkd_terms
from fusionkd.models import create_model


# ----------------------------------------------------------------------------- by hand
def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _hand_dkd(s: list[list[float]], t: list[list[float]], y: list[int], T: float) -> tuple[float, float]:
    """``(T^2 * mean KL(b_t || b_s), T^2 * mean KL(q_t || q_s))`` with plain floats: the binary
    (target, non-target) probabilities and the softmax over the non-target logits written out."""
    tckd = nckd = 0.0
    for zs, zt, k in zip(s, t, y):
        ps, pt = _softmax([v / T for v in zs]), _softmax([v / T for v in zt])
        b_s, b_t = [ps[k], 1.0 - ps[k]], [pt[k], 1.0 - pt[k]]
        # the non-target softmax: the target logit removed, the rest renormalised
        q_s = _softmax([v / T for j, v in enumerate(zs) if j != k])
        q_t = _softmax([v / T for j, v in enumerate(zt) if j != k])
        tckd += _kl(b_t, b_s)
        nckd += _kl(q_t, q_s)
    n = len(s)
    return T * T * tckd / n, T * T * nckd / n


S = [[1.0, 2.0, 0.5], [0.0, -1.0, 2.0], [3.0, 0.0, -2.0]]
TT = [[2.0, 1.0, 0.0], [1.0, 0.0, 3.0], [0.5, 0.5, 1.0]]
Y = [1, 2, 0]


def test_dkd_loss_matches_hand_computation():
    tckd, nckd = dkd_loss(torch.tensor(S), torch.tensor(TT), torch.tensor(Y), 4.0)
    h_tckd, h_nckd = _hand_dkd(S, TT, Y, 4.0)
    assert tckd.item() == pytest.approx(h_tckd, rel=1e-5)
    assert nckd.item() == pytest.approx(h_nckd, rel=1e-5)
    # a spot value, so that a wrong hand formula would be caught too: T = 1, one sample, target class 0
    # student (0, 0, 0): b_s = (1/3, 2/3), q_s = (1/2, 1/2)
    # teacher (0, log 2, 0): p_t = (1/4, 1/2, 1/4), b_t = (1/4, 3/4), q_t = (2/3, 1/3)
    tckd, nckd = dkd_loss(torch.zeros(1, 3), torch.tensor([[0.0, math.log(2.0), 0.0]]), torch.tensor([0]), 1.0)
    assert tckd.item() == pytest.approx(0.25 * math.log(0.75) + 0.75 * math.log(1.125), rel=1e-5)
    assert nckd.item() == pytest.approx(2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3), rel=1e-5)
    # the DKD identity KD = TCKD + (1 - p_t,y) * NCKD (the paper's Eq. 3), at T = 1
    kd = _kl([0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3])
    assert tckd.item() + 0.75 * nckd.item() == pytest.approx(kd, rel=1e-5)


def test_dkd_terms_weights_and_zero_weights():
    s, t, y = torch.tensor(S), torch.tensor(TT), torch.tensor(Y)
    h_tckd, h_nckd = _hand_dkd(S, TT, Y, 2.0)
    ce = sum(-math.log(_softmax(z)[k]) for z, k in zip(S, Y)) / len(S)
    opts = DKDOptions(ce_weight=0.5, alpha=2.0, beta=3.0, temperature=2.0, warmup_epochs=4)
    terms = dkd_terms(s, t, y, opts, epoch=1)  # warm-up factor 2/4
    assert set(terms) == {"loss_ce", "loss_tckd", "loss_nckd"}
    assert terms["loss_ce"].item() == pytest.approx(0.5 * ce, rel=1e-5)
    assert terms["loss_tckd"].item() == pytest.approx(0.5 * 2.0 * h_tckd, rel=1e-5)
    assert terms["loss_nckd"].item() == pytest.approx(0.5 * 3.0 * h_nckd, rel=1e-5)
    assert set(dkd_terms(s, t, y, DKDOptions(alpha=0.0), 0)) == {"loss_ce", "loss_nckd"}
    assert set(dkd_terms(s, t, y, DKDOptions(ce_weight=0.0, beta=0.0), 0)) == {"loss_tckd"}


# ----------------------------------------------------------------------------- mdistiller's formula
def _mdistiller_reference(logits_student, logits_teacher, target, alpha, beta, temperature):
    """Our re-writing of the masking formula of mdistiller/distillers/DKD.py: probabilities summed under a
    target mask and a non-target mask, concatenated; the target logit pushed away by ``- 1000 * gt_mask``;
    summed KL times ``T^2`` divided by the batch size."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target[:, None], 1).bool()
    other_mask = ~gt_mask
    p_s = F.softmax(logits_student / temperature, dim=1)
    p_t = F.softmax(logits_teacher / temperature, dim=1)

    def cat_mask(p):
        return torch.cat([(p * gt_mask).sum(1, keepdim=True), (p * other_mask).sum(1, keepdim=True)], dim=1)

    n = target.shape[0]
    tckd = F.kl_div(torch.log(cat_mask(p_s)), cat_mask(p_t), reduction="sum") * temperature**2 / n
    p_t2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_p_s2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_p_s2, p_t2, reduction="sum") * temperature**2 / n
    return alpha * tckd + beta * nckd, tckd, nckd


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_matches_a_reimplementation_of_mdistillers_formula(temperature):
    g = torch.Generator().manual_seed(7)
    s, t = 3 * torch.randn(16, 10, generator=g), 3 * torch.randn(16, 10, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    ref, ref_tckd, ref_nckd = _mdistiller_reference(s.double(), t.double(), y, 1.0, 8.0, temperature)
    tckd, nckd = dkd_loss(s, t, y, temperature)
    assert tckd.item() == pytest.approx(ref_tckd.item(), rel=1e-5, abs=1e-7)
    assert nckd.item() == pytest.approx(ref_nckd.item(), rel=1e-5, abs=1e-7)
    terms = dkd_terms(s, t, y, DKDOptions(ce_weight=0.0, temperature=temperature), epoch=19)  # full weight
    assert sum(terms.values()).item() == pytest.approx(ref.item(), rel=1e-5)


def test_soft_targets_are_the_mixture_of_the_two_classes():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    a, b = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([3, 3, 0, 3, 1, 0])  # the last row: one class
    lam = 0.3
    soft = lam * F.one_hot(a, 5).float() + (1 - lam) * F.one_hot(b, 5).float()
    per_a = [dkd_loss(s[i:i + 1], t[i:i + 1], a[i:i + 1], 4.0) for i in range(6)]
    per_b = [dkd_loss(s[i:i + 1], t[i:i + 1], b[i:i + 1], 4.0) for i in range(6)]
    expected = [sum(lam * pa[j] + (1 - lam) * pb[j] for pa, pb in zip(per_a, per_b)) / 6 for j in range(2)]
    got = dkd_loss(s, t, soft, 4.0)
    for j in range(2):
        assert got[j].item() == pytest.approx(expected[j].item(), rel=1e-5)
    # one-hot targets give the hard-label value
    assert torch.allclose(torch.stack(dkd_loss(s, t, F.one_hot(a, 5).float(), 4.0)),
                          torch.stack(dkd_loss(s, t, a, 4.0)))


def test_a_very_confident_teacher_gives_finite_losses_and_gradients():
    s = torch.tensor([[0.0, 1.0, -1.0]], requires_grad=True)
    t = torch.tensor([[500.0, 0.0, -3.0]])  # p_t of the non-target classes underflows at T = 1
    tckd, nckd = dkd_loss(s, t, torch.tensor([0]), 1.0)
    (tckd + nckd).backward()
    assert torch.isfinite(tckd) and torch.isfinite(nckd) and torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match="at least 2 classes"):
        dkd_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 4.0)


# ----------------------------------------------------------------------------- warm-up
def test_warmup_counts_epochs_from_one_as_mdistiller_does():
    # mdistiller: min(epoch / 20, 1) with epochs 1, 2, ...; fusionkd's epoch 0 is their epoch 1
    assert warmup_factor(0, 20) == pytest.approx(1 / 20)
    assert warmup_factor(9, 20) == pytest.approx(0.5)
    assert warmup_factor(19, 20) == 1.0
    assert warmup_factor(30, 20) == 1.0
    assert warmup_factor(0, 0) == 1.0  # no warm-up
    s, t, y = torch.tensor(S), torch.tensor(TT), torch.tensor(Y)
    full = dkd_terms(s, t, y, DKDOptions(), epoch=30)
    for epoch, factor in [(0, 0.05), (9, 0.5), (19, 1.0)]:
        terms = dkd_terms(s, t, y, DKDOptions(), epoch=epoch)
        assert terms["loss_ce"].item() == pytest.approx(full["loss_ce"].item())  # CE is never warmed up
        for key in ("loss_tckd", "loss_nckd"):
            assert terms[key].item() == pytest.approx(factor * full[key].item(), rel=1e-6)


# ----------------------------------------------------------------------------- what one step trains
def _make(epochs: int = 10, **options):
    torch.manual_seed(0)
    teacher = create_model("resnet32", num_classes=10, in_chans=1)
    with torch.no_grad():  # non-trivial BN statistics, as a trained teacher has
        teacher.train()
        teacher(torch.randn(8, 1, 28, 28))
    teacher.eval()
    ctx = MethodContext(model="resnet20", num_classes=10, in_chans=1, image_size=28, epochs=epochs,
                        teacher=Teacher(teacher, "resnet32", {}))
    return METHODS.get("dkd")(ctx, DKDOptions(**options))


def test_one_step_trains_the_student_only_with_detached_teacher_logits():
    m = _make()
    m.train()
    teacher_before = copy.deepcopy(m.teacher.state_dict())
    seen = spy_teacher(m)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)
    terms = m.training_step(x, y, epoch=0)
    assert set(terms) == {"loss_ce", "loss_tckd", "loss_nckd"}
    sum(terms.values()).backward()
    assert len(seen) == 1 and not seen[0][1].requires_grad and seen[0][1].grad_fn is None
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    assert all(torch.equal(v, m.teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert not m.teacher.training
    student = list(m.net.parameters())
    assert student and all(p.grad is not None and torch.isfinite(p.grad).all() for p in student)
    assert all(p.grad.abs().sum() > 0 for p in student)
    # the distillation terms alone also reach the student
    m.zero_grad(set_to_none=True)
    dkd_only = m.training_step(x, y, epoch=0)
    (dkd_only["loss_tckd"] + dkd_only["loss_nckd"]).backward()
    for part in (m.net.stem, m.net.stages[-1], m.net.head):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("options, fragment", [
    ({"alpha": -1.0}, "alpha must be >= 0"),
    ({"beta": -0.5}, "beta must be >= 0"),
    ({"ce_weight": -1.0}, "ce_weight must be >= 0"),
    ({"ce_weight": 0.0, "alpha": 0.0, "beta": 0.0}, "at least one of ce_weight, alpha, beta"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"temperature": -2.0}, "temperature must be > 0"),
    ({"warmup_epochs": -1}, "warmup_epochs must be >= 0"),
])
def test_bad_options_are_refused_naming_the_option(options, fragment):
    assert_option_refused("dkd", DKDOptions, options, fragment)


def test_defaults_registry_and_config_overrides():
    cls = METHODS.get("dkd")
    assert cls.family == "offline" and cls.needs_teacher and cls.Options is DKDOptions
    assert cls.recipe_epochs == 240
    d = DKDOptions()
    assert (d.ce_weight, d.alpha, d.beta, d.temperature, d.warmup_epochs) == (1.0, 1.0, 8.0, 4.0, 20)
    assert build_options(cls, {}, "dkd") == d
    cfg = resolve_config({"method": "dkd", "teacher": "t.pt"},
                         overrides=["options.beta=2", "options.warmup_epochs=5", "options.temperature=1"])
    assert cfg.options == {"beta": 2, "warmup_epochs": 5, "temperature": 1}
    assert build_options(cls, cfg.options, "dkd") == DKDOptions(beta=2.0, warmup_epochs=5, temperature=1.0)


# ----------------------------------------------------------------------------- end to end
def test_cli_two_step_recipe_with_dkd(tmp_path):
    run, best = two_step_cli(tmp_path, "dkd", "options.beta=4", "options.warmup_epochs=2")
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["config"]["method"] == "dkd" and ckpt["config"]["options"] == {"beta": 4, "warmup_epochs": 2}
    assert_teacher_unchanged(run / "last.pt", best)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert {"loss_ce", "loss_tckd", "loss_nckd"} <= set(line["train"])
        assert line["train"]["loss_nckd"] > 0 and set(line["val"]) == {"net"}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["family"] == "offline" and summary["deploy_model"] == "resnet20"
