"""FRSKD's ramp-up of its KD and AT terms (``options.rampup_epochs``, off by default), and the warning a run
gets when it is much shorter than the recipe its method's defaults were published for (issue #24.7)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from gradflow import batch, build_method, reached, under
from handmath import ce_row, kl_t

import fusionkd
from fusionkd.engine.config import ConfigError, build_options
from fusionkd.methods import METHODS
from fusionkd.methods.base import SHORT_RUN_FRACTION, recipe_option_names, short_run_warning
from fusionkd.methods.frskd import FRSKD, FRSKDOptions, FRSKDOutputs
from fusionkd.methods.losses import attention_transfer, kl_div


def make(**options) -> FRSKD:
    return build_method(FRSKD, "resnet20", 28, 1, **options)


def hand_ramp(t: float, r: float) -> float:
    """``exp(-5 (1 - min(t, R)/R)^2)``, written out."""
    return math.exp(-5.0 * (1.0 - min(t, r) / r) ** 2)


# ----------------------------------------------------------------------------- the weight
def test_weight_is_the_sigmoid_ramp_by_hand():
    m = make(rampup_epochs=4)
    assert m.rampup_weight(0) == pytest.approx(math.exp(-5.0), rel=1e-12)  # 0.0067: the ramp's start
    assert m.rampup_weight(1) == pytest.approx(math.exp(-5.0 * 0.75**2), rel=1e-12)  # 0.0600
    assert m.rampup_weight(2) == pytest.approx(math.exp(-1.25), rel=1e-12)  # 0.2865
    assert m.rampup_weight(3) == pytest.approx(math.exp(-5.0 / 16), rel=1e-12)  # 0.7316
    assert m.rampup_weight(4) == 1.0 and m.rampup_weight(9) == 1.0  # full weight from t = R on
    fractional = make(rampup_epochs=2.5)
    assert fractional.rampup_weight(1) == pytest.approx(math.exp(-5.0 * 0.6**2), rel=1e-12)
    for t in range(6):
        assert fractional.rampup_weight(t) == pytest.approx(hand_ramp(t, 2.5), rel=1e-12)
    off = make()
    assert off.options.rampup_epochs == 0.0
    assert all(off.rampup_weight(t) == 1.0 for t in (0, 1, 5, 199))


def test_every_step_of_an_epoch_gets_that_epochs_weight():
    """training_step(epoch=t) scales KD and AT by w(t) and leaves both CE terms alone, on any batch."""
    m = make(rampup_epochs=3)
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)
        full = m.training_step(x, y, 3)  # w = 1 from t = R on
        for t in (0, 1, 2):
            w = hand_ramp(t, 3)
            terms = m.training_step(x, y, t)
            assert terms["loss_kd"].item() == pytest.approx(w * full["loss_kd"].item(), rel=1e-5)
            assert terms["loss_at"].item() == pytest.approx(w * full["loss_at"].item(), rel=1e-5)
            assert terms["loss_ce"].item() == pytest.approx(full["loss_ce"].item(), rel=1e-6)
            assert terms["loss_ce_teacher"].item() == pytest.approx(full["loss_ce_teacher"].item(), rel=1e-6)


# ----------------------------------------------------------------------------- the loss
def test_loss_at_the_ramp_start_by_hand():
    """At t = 0: CE(z_c) + CE(z_t) + e^-5 alpha KL_T(z_t -> z_c) + e^-5 beta sum_i AT(F_i, T_i)."""
    zc, zt = [1.0, 2.0, 0.0], [2.0, 0.0, 1.0]
    label, temp, alpha, beta = 1, 4.0, 2.0, 3.0
    f = torch.tensor([[1.0, 2.0], [2.0, 0.0]]).view(1, 1, 2, 2)  # mean_c f^2 = [1, 4, 4, 0]
    t = torch.stack([torch.ones(2, 2), torch.tensor([[1.0, -1.0], [3.0, 1.0]])]).unsqueeze(0)  # [1, 1, 5, 1]
    at_hand = sum((a / math.sqrt(33.0) - b / math.sqrt(28.0)) ** 2 for a, b in zip((1, 4, 4, 0), (1, 1, 5, 1))) / 4
    w0 = math.exp(-5.0)

    m = make(alpha=alpha, beta=beta, temperature=temp, rampup_epochs=10)
    out = FRSKDOutputs(maps=[f, f], logits=torch.tensor([zc]), refined=[t, t], teacher_logits=torch.tensor([zt]))
    terms = m.losses(out, torch.tensor([label]), m.rampup_weight(0))
    assert terms["loss_ce"].item() == pytest.approx(ce_row(zc, label), rel=1e-6)
    assert terms["loss_ce_teacher"].item() == pytest.approx(ce_row(zt, label), rel=1e-6)
    assert terms["loss_kd"].item() == pytest.approx(w0 * alpha * kl_t(zt, zc, temp), rel=1e-5)
    assert terms["loss_at"].item() == pytest.approx(w0 * beta * 2 * at_hand, rel=1e-5)
    half = m.losses(out, torch.tensor([label]), m.rampup_weight(5))  # t = R/2: exp(-5/4)
    assert half["loss_kd"].item() == pytest.approx(math.exp(-1.25) * alpha * kl_t(zt, zc, temp), rel=1e-5)


def test_off_by_default_is_exactly_the_papers_loss():
    """rampup_epochs=0 (the default): every epoch's terms are, bit for bit, the loss before the option existed."""
    assert FRSKDOptions().rampup_epochs == 0.0
    m = make()
    x, y = batch()
    out = m.forward_all(x)
    o = m.options
    old = {  # FRSKD.losses as it was written before the ramp-up
        "loss_ce": torch.nn.functional.cross_entropy(out.logits.float(), y),
        "loss_ce_teacher": torch.nn.functional.cross_entropy(out.teacher_logits.float(), y),
        "loss_kd": o.alpha * kl_div(out.logits, out.teacher_logits, o.temperature),
        "loss_at": o.beta * sum(attention_transfer(f, t) for f, t in zip(out.maps, out.refined)),
    }
    new = m.losses(out, y, m.rampup_weight(0))
    assert set(new) == set(old)
    for k in old:
        assert torch.equal(new[k], old[k]), k
    first, late = m.training_step(x, y, 0), m.training_step(x, y, 150)
    for k in first:
        assert torch.equal(first[k], late[k]), k


# ----------------------------------------------------------------------------- what the ramp trains
def test_the_ramp_scales_what_kd_and_at_train_and_leaves_the_rest():
    """At t = 0 the KD and AT terms still reach the classifier only (their targets stay detached: no
    self-teacher parameter gets a gradient from them), with gradients w(0) times the unramped ones; the
    self-teacher's CE, which trains the self-teacher and the classifier's stages, is unchanged."""
    m = make(rampup_epochs=5)
    x, y = batch()
    params = {n for n, _ in m.named_parameters()}
    teacher, classifier = under(params, "teacher."), under(params, "net.")
    w0 = m.rampup_weight(0)

    def grads(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        m.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    out = m.forward_all(x)  # one forward pass: the two losses differ only by the weight
    ramped, unramped = m.losses(out, y, w0), m.losses(out, y, 1.0)
    for term in ("loss_kd", "loss_at"):
        names = reached(m, ramped[term])
        assert names and names <= classifier and not (names & teacher), term
        assert names == reached(m, unramped[term]), term
        g_ramped, g_full = grads(ramped[term]), grads(unramped[term])
        for n in names:
            scale = float(g_full[n].abs().max())
            assert torch.allclose(g_ramped[n], w0 * g_full[n], rtol=1e-4, atol=1e-5 * w0 * scale), (term, n)
    ce_t_ramped, ce_t_full = grads(ramped["loss_ce_teacher"]), grads(unramped["loss_ce_teacher"])
    assert set(ce_t_ramped) == set(ce_t_full) and under(set(ce_t_ramped), "teacher.") == teacher
    for n in ce_t_full:
        assert torch.allclose(ce_t_ramped[n], ce_t_full[n], rtol=1e-5, atol=1e-7), n


def test_rampup_epochs_is_range_checked():
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="rampup_epochs"):
            FRSKDOptions(rampup_epochs=bad).validate()
    with pytest.raises(ConfigError, match="rampup_epochs"):
        build_options(FRSKD, {"rampup_epochs": -2}, "frskd")
    assert build_options(FRSKD, {"rampup_epochs": 5}, "frskd").rampup_epochs == 5


# ----------------------------------------------------------------------------- the short-run warning
def test_every_method_declares_its_recipe_length():
    for name in METHODS.names():
        cls = METHODS.get(name)
        assert cls.recipe_epochs is None or (isinstance(cls.recipe_epochs, int) and cls.recipe_epochs > 0), name
    expected = {"frskd": 200, "ffl": 300, "ffl_s": 300, "mfef": 300, "one": 300, "dml": 200, "byot": 200,
                "at": 200, "kd": 240, "fitnet": 240, "baseline": None, "mfkd": None, "fmfsd": None}
    for name, epochs in expected.items():
        assert METHODS.get(name).recipe_epochs == epochs, name
    assert recipe_option_names(FRSKD) == ("alpha", "beta", "rampup_epochs")
    ffl = recipe_option_names(METHODS.get("ffl"))  # by default the float options: weights, temperatures, ramps
    assert {"temperature", "rampup_epochs"} <= set(ffl) and not {"peers", "batched_peers", "deploy"} & set(ffl)


def test_short_run_warning_text_and_threshold():
    msg = short_run_warning(FRSKD, 8, {})
    assert msg is not None
    assert msg.startswith("frskd's defaults (alpha=2 beta=100 rampup_epochs=0) were published for a 200-epoch "
                          "schedule; this run has 8 (less than 25% of it).")
    assert "options.rampup_epochs=8 " in msg  # the measured remedy, sized to this run
    assert "options.alpha=0.8 options.beta=37" in msg and "docs/tune.md" in msg
    assert SHORT_RUN_FRACTION == 0.25
    assert short_run_warning(FRSKD, 49, {}) is not None  # < 200 / 4
    assert short_run_warning(FRSKD, 50, {}) is None and short_run_warning(FRSKD, 200, None) is None
    # the user chose the weights or the ramp: no warning; other options do not count
    assert short_run_warning(FRSKD, 8, {"alpha": 2.0}) is None
    assert short_run_warning(FRSKD, 8, {"beta": 37}) is None
    assert short_run_warning(FRSKD, 8, {"rampup_epochs": 8}) is None
    assert short_run_warning(FRSKD, 8, {"upsample": "nearest", "temperature": 3.0, "width": 1}) is not None
    # a method without a published recipe, and one without a measured short-run setting
    assert short_run_warning(METHODS.get("baseline"), 1, {}) is None
    ffl = short_run_warning(METHODS.get("ffl"), 10, {"peers": 3})
    assert ffl is not None and "300-epoch" in ffl and "No setting for short runs has been measured" in ffl
    assert short_run_warning(METHODS.get("ffl"), 10, {"temperature": 3.0}) is None


def _train(tmp_path, caplog, **kw):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusionkd"):
        r = fusionkd.train(method="frskd", model="resnet20", dataset="synthetic",
                           dataset_options={"num_classes": 3, "in_chans": 1, "train_size": 48, "test_size": 12},
                           image_size=28, val_fraction=0.25, batch_size=16, eval_batch_size=32, progress="none",
                           threads=1, out_dir=str(tmp_path), **kw)
    return r, [rec.getMessage() for rec in caplog.records if "were published for a" in rec.getMessage()]


def test_a_short_run_warns_once_at_its_start(tmp_path, caplog):
    r, warnings = _train(tmp_path, caplog, name="short", epochs=2, stop_after=1)
    assert len(warnings) == 1 and "this run has 2" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusionkd"):
        fusionkd.resume(r.run_dir)  # the second epoch: no second warning
    assert not [rec for rec in caplog.records if "were published for a" in rec.getMessage()]
    _, warnings = _train(tmp_path, caplog, name="set", epochs=1, options={"alpha": 0.8, "beta": 37.0})
    assert warnings == []
