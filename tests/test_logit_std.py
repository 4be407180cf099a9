"""Logit standardization (Sun, Ren, Li, Wang, Cao, "Logit Standardization in Knowledge Distillation",
CVPR 2024) as the ``logit_std`` option of every method with a KL-between-logits term: the z-score itself,
its invariance, each method's training step with the option on and off, the authors' loss re-written here,
and the config key."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fusionkd.engine.config import build_options, resolve_config
from fusionkd.methods import METHODS, Method, MethodContext, Teacher
from fusionkd.methods.dkd import DKDOptions, dkd_loss, dkd_terms
from fusionkd.methods.kd import KDOptions, kd_terms
from fusionkd.methods.losses import kl_div, standardize_logits
from fusionkd.models import create_model

#: every method whose options have ``logit_std``, with options that make its KL terms present
WITH_OPTION = {
    "kd": {}, "fitnet": {"kd_weight": 0.9}, "at": {"kd_weight": 0.9}, "dkd": {}, "mfkd": {},
    "dml": {}, "one": {}, "ffl": {}, "ffl_s": {}, "mfef": {"peer_kl": 1.0},
    "frskd": {}, "byot": {}, "fmfsd": {}, "crd": {"kd_weight": 0.9, "nce_k": 16, "feat_dim": 8},
}


# ----------------------------------------------------------------------------- the z-score
def test_standardize_logits_by_hand():
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    # row 1: mean 2, sample variance ((-1)^2 + 0 + 1^2) / (3 - 1) = 1
    # row 2: mean 2, sample variance (4 + 4 + 16) / 2 = 12, std = 2 sqrt(3)
    s = 2.0 * math.sqrt(3.0)
    expected = torch.tensor([[-1.0, 0.0, 1.0], [-2.0 / s, -2.0 / s, 4.0 / s]])
    out = standardize_logits(z)
    assert out.dtype == torch.float32 and out.shape == z.shape
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # the sample (N - 1) std, not the population one: the population z-score of row 2 is different
    population = (z[1] - z[1].mean()) / z[1].std(unbiased=False)
    assert not torch.allclose(out[1], population, atol=1e-3)


def test_standardize_logits_constant_row_and_eps():
    z = torch.tensor([[5.0, 5.0, 5.0, 5.0]])
    out = standardize_logits(z)
    assert torch.isfinite(out).all() and torch.equal(out, torch.zeros_like(z))
    # eps is added to the std: a std of 1 gives (z - mean) / (1 + eps)
    out = standardize_logits(torch.tensor([[-1.0, 0.0, 1.0]]), eps=0.5)
    torch.testing.assert_close(out, torch.tensor([[-1 / 1.5, 0.0, 1 / 1.5]]))
    assert standardize_logits(torch.tensor([[3.0, 1.0]], dtype=torch.bfloat16)).dtype == torch.float32


def test_kl_is_invariant_to_student_scale_and_row_shift_only_when_standardized():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 10, generator=g)
    t = 3.0 * torch.randn(6, 10, generator=g)
    shift = 5.0 * torch.randn(6, 1, generator=g)
    moved = 2.5 * s + shift
    for temperature in (1.0, 2.0, 4.0):
        on, on_moved = kl_div(s, t, temperature, standardize=True), kl_div(moved, t, temperature, standardize=True)
        torch.testing.assert_close(on, on_moved, rtol=1e-5, atol=1e-6)
        off, off_moved = kl_div(s, t, temperature), kl_div(moved, t, temperature)
        assert abs(off.item() - off_moved.item()) > 1e-2
        assert abs(on.item() - off.item()) > 1e-3
    # the teacher side too, and DKD's terms
    torch.testing.assert_close(kl_div(s, t, 2.0, standardize=True), kl_div(s, 0.1 * t - 7.0, 2.0, standardize=True),
                               rtol=1e-5, atol=1e-6)
    y = torch.randint(0, 10, (6,), generator=g)
    for a, b in zip(dkd_loss(s, t, y, 2.0, True), dkd_loss(moved, t, y, 2.0, True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert abs(dkd_loss(s, t, y, 2.0)[1].item() - dkd_loss(moved, t, y, 2.0)[1].item()) > 1e-2


def test_standardized_kl_trains_the_student_only():
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    kl_div(s, t, 2.0, standardize=True).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


# ----------------------------------------------------------------------------- the authors' loss
def authors_normalize(logit: torch.Tensor) -> torch.Tensor:
    """The authors' ``normalize``, written from its description: torch's default (unbiased) std, 1e-7
    added to it."""
    return (logit - logit.mean(dim=-1, keepdim=True)) / (1e-7 + logit.std(dim=-1, keepdim=True))


def authors_kd(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Their KD: KL of softmax of the normalized logits over T, summed over classes, batch mean, times T^2."""
    log_p_s = F.log_softmax(authors_normalize(s) / temperature, dim=1)
    p_t = F.softmax(authors_normalize(t) / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="none").sum(1).mean() * temperature ** 2


def authors_dkd(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float) -> tuple[torch.Tensor, ...]:
    """Their DKD with ``logit_stand``: normalize first, then the usual TCKD / NCKD (masking the target by
    subtracting 1000 before the softmax)."""
    s, t = authors_normalize(s), authors_normalize(t)
    gt = F.one_hot(y, s.shape[1]).float()
    p_s, p_t = F.softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * (1 - gt)).sum(1)], dim=1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * (1 - gt)).sum(1)], dim=1)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * temperature ** 2 / y.shape[0]
    q_t = F.softmax(t / temperature - 1000.0 * gt, dim=1)
    log_q_s = F.log_softmax(s / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="sum") * temperature ** 2 / y.shape[0]
    return tckd, nckd


def fixed_logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return (2.0 * torch.randn(5, 8, generator=g, dtype=torch.float64).float(),
            4.0 * torch.randn(5, 8, generator=g, dtype=torch.float64).float() + 1.0,
            torch.randint(0, 8, (5,), generator=g))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_matches_the_authors_loss(temperature):
    s, t, y = fixed_logits()
    opts = KDOptions(ce_weight=0.0, kd_weight=1.0, temperature=temperature, logit_std=True)
    ours = kd_terms(s, t, y, opts)["loss_kd"]
    torch.testing.assert_close(ours, authors_kd(s, t, temperature), rtol=1e-5, atol=1e-6)
    # and it is not plain KD
    plain = kd_terms(s, t, y, KDOptions(ce_weight=0.0, kd_weight=1.0, temperature=temperature))["loss_kd"]
    assert abs(plain.item() - ours.item()) > 1e-3


def test_dkd_matches_the_authors_loss():
    s, t, y = fixed_logits()
    opts = DKDOptions(alpha=1.0, beta=8.0, temperature=2.0, warmup_epochs=0, logit_std=True)
    terms = dkd_terms(s, t, y, opts, epoch=0)
    tckd, nckd = authors_dkd(s, t, y, 2.0)
    torch.testing.assert_close(terms["loss_tckd"], tckd, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["loss_nckd"], 8.0 * nckd, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- every method
def build(name: str, **options) -> Method:
    torch.manual_seed(0)
    cls = METHODS.get(name)
    teacher = None
    if cls.needs_teacher:
        t = create_model("resnet20", num_classes=10, in_chans=1)
        with torch.no_grad():  # non-trivial BN statistics, as a trained teacher has
            t.train()
            t(torch.randn(8, 1, 16, 16))
        t.eval()
        teacher = Teacher(t, "resnet20", {"test_accuracy": 91.0, "path": "t.pt"})
    ctx = MethodContext(model="resnet20", num_classes=10, in_chans=1, image_size=16, epochs=10, teacher=teacher,
                        train_labels=torch.arange(40) % 10 if cls.needs_indices else None)
    return cls(ctx, cls.Options(**options))


def step(name: str, logit_std: bool) -> tuple[dict[str, torch.Tensor], Method]:
    m = build(name, **WITH_OPTION[name], logit_std=logit_std)
    m.train()
    epoch = 9  # past every warm-up / fusion stage at 10 epochs
    m.on_epoch_start(epoch)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 1, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
    if m.needs_indices:  # crd: the batch's dataset indices, whose classes are the labels
        idx = torch.arange(4) * 10 + y
        return m.training_step(x, y, epoch, indices=idx), m
    return m.training_step(x, y, epoch), m


def is_kl(term: str) -> bool:
    return "_kd" in term or "_kl" in term or term in ("loss_tckd", "loss_nckd")


def test_every_method_with_a_kl_term_has_the_option():
    for name in WITH_OPTION:
        opts = METHODS.get(name).Options()
        assert opts.logit_std is False, name


@pytest.mark.parametrize("name", sorted(WITH_OPTION))
def test_training_step_with_and_without_logit_std(name):
    off, _ = step(name, False)
    on, m = step(name, True)
    assert set(on) == set(off)
    kl_terms = [k for k in on if is_kl(k)]
    ce_terms = [k for k in on if k.startswith("loss_ce")]
    assert kl_terms and ce_terms, sorted(on)
    for k in kl_terms:
        assert torch.isfinite(on[k]) and abs(on[k].item() - off[k].item()) > 1e-7 * max(1.0, abs(off[k].item())), k
    for k in ce_terms:
        torch.testing.assert_close(on[k], off[k], rtol=0, atol=0, msg=k)
    loss = sum(on.values())
    assert torch.isfinite(loss)
    m.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    assert any(gr.abs().sum() > 0 for gr in grads)


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("name", sorted(WITH_OPTION))
def test_config_key_resolves(name):
    cls = METHODS.get(name)
    raw = {"method": name, "teacher": "t.pt"} if cls.needs_teacher else {"method": name}
    cfg = resolve_config(raw, overrides=["options.logit_std=true"])
    assert cfg.options == {"logit_std": True}
    opts = build_options(cls, cfg.options, name)
    assert opts.logit_std is True and opts == cls.Options(logit_std=True)
