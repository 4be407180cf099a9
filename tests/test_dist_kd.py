"""``dist`` (DIST, Huang et al., NeurIPS 2022): the loss against a hand computation and against an
independent re-implementation of the authors' formula, its invariances, what one step trains, option checks
and one end-to-end run through the teacher workflow."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from test_offline_engine import TINY, assert_teacher_unchanged
from test_offline_methods import batch, groups, make, sgd_steps

import fusionkd
from fusionkd.engine.config import ConfigError, build_options, resolve_config
from fusionkd.methods import METHODS
from fusionkd.methods.base import short_run_warning
from fusionkd.methods.dist import DIST, DISTOptions, dist_relations, dist_terms, pearson_rows

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 1.0]]
T_ = [[2.0, 1.0, 0.0], [0.5, 0.0, 2.5], [1.0, 3.0, -1.0]]


# ----------------------------------------------------------------------------- by hand, plain floats
def _softmax(xs: list[float]) -> list[float]:
    e = [math.exp(x - max(xs)) for x in xs]
    return [v / sum(e) for v in e]


def _pearson(a: list[float], b: list[float], eps: float = 1e-8) -> float:
    """sum((a - mean a)(b - mean b)) / (sqrt(sum (a - mean a)^2) * sqrt(sum (b - mean b)^2) + eps)."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    ca, cb = [x - ma for x in a], [x - mb for x in b]
    num = sum(x * y for x, y in zip(ca, cb))
    den = math.sqrt(sum(x * x for x in ca)) * math.sqrt(sum(y * y for y in cb))
    return num / (den + eps)


def _hand_dist(s: list[list[float]], t: list[list[float]], temp: float) -> tuple[float, float]:
    ps = [_softmax([v / temp for v in row]) for row in s]
    pt = [_softmax([v / temp for v in row]) for row in t]
    rows = [_pearson(a, b) for a, b in zip(ps, pt)]
    k = len(ps[0])
    cols = [_pearson([r[j] for r in ps], [r[j] for r in pt]) for j in range(k)]
    return temp ** 2 * (1 - sum(rows) / len(rows)), temp ** 2 * (1 - sum(cols) / len(cols))


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_relations_match_a_hand_computation(temp):
    inter, intra = dist_relations(torch.tensor(S), torch.tensor(T_), temp)
    hand_inter, hand_intra = _hand_dist(S, T_, temp)
    assert inter.item() == pytest.approx(hand_inter, rel=1e-5, abs=1e-6)
    assert intra.item() == pytest.approx(hand_intra, rel=1e-5, abs=1e-6)
    assert hand_inter > 0.01 and hand_intra > 0.01  # a non-trivial example


def test_weighted_terms_match_a_hand_computation():
    y = [2, 0, 1]
    opts = DISTOptions(ce_weight=0.5, beta=3.0, gamma=0.25, temperature=2.0)
    terms = dist_terms(torch.tensor(S), torch.tensor(T_), torch.tensor(y), opts)
    assert set(terms) == {"loss_ce", "loss_inter", "loss_intra"}
    hand_inter, hand_intra = _hand_dist(S, T_, 2.0)
    hand_ce = sum(-math.log(_softmax(z)[k]) for z, k in zip(S, y)) / 3
    assert terms["loss_ce"].item() == pytest.approx(0.5 * hand_ce, rel=1e-6)
    assert terms["loss_inter"].item() == pytest.approx(3.0 * hand_inter, rel=1e-5)
    assert terms["loss_intra"].item() == pytest.approx(0.25 * hand_intra, rel=1e-5)
    # a zero weight leaves its term out
    assert set(dist_terms(torch.tensor(S), torch.tensor(T_), torch.tensor(y),
                          DISTOptions(ce_weight=0.0, gamma=0.0))) == {"loss_inter"}


# ----------------------------------------------------------------------------- the authors' formula, re-written
def _reference_dist_loss(z_s, z_t, y, ori_loss_weight, kd_loss_weight, beta, gamma, tau):
    """The authors' classification code as we read it (image_classification_sota, lib/models/losses/dist_kd.py
    and kd_loss.py), written out here: ``ori_w * CE + kd_w * DIST(beta, gamma, tau)``, where DIST is
    ``beta * tau^2 * (1 - mean_rows pearson) + gamma * tau^2 * (1 - mean_cols pearson)`` and pearson a cosine
    similarity of mean-centred vectors with 1e-8 added to the product of the norms."""
    def cos(a, b):
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)

    def pear(a, b):
        return cos(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1))

    y_s, y_t = (z_s / tau).softmax(dim=1), (z_t / tau).softmax(dim=1)
    inter = tau ** 2 * (1 - pear(y_s, y_t).mean())
    intra = tau ** 2 * (1 - pear(y_s.transpose(0, 1), y_t.transpose(0, 1)).mean())
    return ori_loss_weight * F.cross_entropy(z_s, y) + kd_loss_weight * (beta * inter + gamma * intra)


@pytest.mark.parametrize("seed, b, k", [(0, 8, 10), (1, 64, 100), (2, 2, 5)])
def test_defaults_equal_the_authors_cifar_setting_on_random_logits(seed, b, k):
    g = torch.Generator().manual_seed(seed)
    z_s, z_t = 3 * torch.randn(b, k, generator=g), 5 * torch.randn(b, k, generator=g)
    y = torch.randint(0, k, (b,), generator=g)
    ours = sum(dist_terms(z_s, z_t, y, DISTOptions()).values())
    # dist_cifar.yaml: kd: dist_t4 (DIST(beta=1, gamma=1, tau=4)), ori_loss_weight 1, kd_loss_weight 2
    ref = _reference_dist_loss(z_s, z_t, y, 1.0, 2.0, 1.0, 1.0, 4.0)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    # other settings: the ImageNet one (tau 1) and arbitrary weights
    for opts, args in [(DISTOptions(beta=2, gamma=2, temperature=1), (1.0, 1.0, 2.0, 2.0, 1.0)),
                       (DISTOptions(ce_weight=0.3, beta=0.7, gamma=1.9, temperature=2.5), (0.3, 1.0, 0.7, 1.9, 2.5))]:
        torch.testing.assert_close(sum(dist_terms(z_s, z_t, y, opts).values()),
                                   _reference_dist_loss(z_s, z_t, y, *args), rtol=1e-6, atol=1e-6)


def test_a_constant_row_has_correlation_zero_as_with_the_authors_eps():
    z_s = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 1.0]])  # row 0: uniform prediction
    z_t = torch.tensor([[3.0, 0.0, 1.0], [1.0, 2.0, 0.0]])
    p_s, p_t = z_s.softmax(1), z_t.softmax(1)
    rho = pearson_rows(p_s, p_t)
    assert rho[0].item() == 0.0 and torch.isfinite(rho).all()
    y = torch.tensor([0, 1])
    torch.testing.assert_close(sum(dist_terms(z_s, z_t, y, DISTOptions()).values()),
                               _reference_dist_loss(z_s, z_t, y, 1.0, 2.0, 1.0, 1.0, 4.0))
    leaf = z_s.clone().requires_grad_(True)
    sum(dist_relations(leaf, z_t, 4.0)).backward()
    assert torch.isfinite(leaf.grad).all()


# ----------------------------------------------------------------------------- invariances
def _random(seed: int, b: int = 6, k: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(b, k, generator=g), 2 * torch.randn(b, k, generator=g)


def test_both_relations_vanish_when_the_student_predicts_what_the_teacher_does():
    z_s, z_t = _random(0)
    inter, intra = dist_relations(z_s, z_t, 4.0)
    assert inter.item() > 1e-3 and intra.item() > 1e-3
    same_inter, same_intra = dist_relations(z_t.clone(), z_t, 4.0)
    # zero up to float32 rounding and the 1e-8 in the denominator (times T^2 = 16)
    assert abs(same_inter.item()) < 1e-4 and abs(same_intra.item()) < 1e-4


def test_a_constant_added_to_each_student_row_changes_nothing_but_a_per_class_one_does():
    z_s, z_t = _random(1)
    inter, intra = dist_relations(z_s, z_t, 4.0)
    shift = torch.linspace(-5, 7, z_s.shape[0]).unsqueeze(1)  # a different constant per row
    s_inter, s_intra = dist_relations(z_s + shift, z_t, 4.0)
    torch.testing.assert_close(s_inter, inter, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_intra, intra, rtol=1e-5, atol=1e-5)
    # a per-class shift does change the softmax, so the test could fail
    c_inter, _ = dist_relations(z_s + torch.linspace(-3, 3, z_s.shape[1]), z_t, 4.0)
    assert abs(c_inter.item() - inter.item()) > 1e-3


def test_relations_ignore_a_joint_reordering_of_samples_or_classes_but_not_a_student_only_one():
    z_s, z_t = _random(2)
    inter, intra = dist_relations(z_s, z_t, 2.0)
    rows, cols = torch.tensor([3, 0, 5, 1, 4, 2]), torch.tensor([6, 2, 0, 4, 1, 5, 3])
    for a, b in [(z_s[rows], z_t[rows]), (z_s[:, cols], z_t[:, cols])]:
        p_inter, p_intra = dist_relations(a, b, 2.0)
        torch.testing.assert_close(p_inter, inter, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p_intra, intra, rtol=1e-5, atol=1e-5)
    m_inter, m_intra = dist_relations(z_s[rows], z_t, 2.0)
    assert abs(m_inter.item() - inter.item()) > 1e-3 and abs(m_intra.item() - intra.item()) > 1e-3


# ----------------------------------------------------------------------------- what it trains
def test_the_teacher_logits_are_detached_inside_the_loss():
    z_s, z_t = _random(3)
    z_s.requires_grad_(True)
    z_t.requires_grad_(True)
    sum(dist_terms(z_s, z_t, torch.zeros(6, dtype=torch.long), DISTOptions()).values()).backward()
    assert z_t.grad is None and z_s.grad is not None and z_s.grad.abs().sum() > 0


@pytest.mark.parametrize("term", ["loss_ce", "loss_inter", "loss_intra"])
def test_each_term_reaches_the_whole_student_and_never_the_teacher(term):
    m = make("dist")
    m.train()
    x, y = batch()
    terms = m.training_step(x, y, 0)
    assert set(terms) == {"loss_ce", "loss_inter", "loss_intra"}
    m.zero_grad(set_to_none=True)
    terms[term].backward()
    hit = {name for name, params in groups(m).items()
           if any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)}
    assert hit == {"student_stem", "student_last_stage", "student_fc"}
    assert all(p.grad is None for p in m.teacher.parameters())


def test_teacher_weights_and_bn_statistics_never_change_and_the_student_does():
    m = make("dist")
    before = copy.deepcopy(m.teacher.state_dict())
    student_before = copy.deepcopy(m.net.state_dict())
    sgd_steps(m, [0, 1])
    assert all(not mod.training for mod in m.teacher.modules())
    assert all(not p.requires_grad and p.grad is None for p in m.teacher.parameters())
    for k, v in m.teacher.state_dict().items():
        assert torch.equal(before[k], v), k
    assert any(not torch.equal(student_before[k], v) for k, v in m.net.state_dict().items())
    assert not any(p is q for p in m.teacher.parameters() for g in m.param_groups(0.0) for q in g["params"])
    # the step's teacher logits carry no graph
    _, t_logits = m.teacher_forward(batch()[0])
    assert not t_logits.requires_grad and t_logits.grad_fn is None


# ----------------------------------------------------------------------------- options and the registry
def test_registry_entry_defaults_and_recipe():
    cls = METHODS.get("dist")
    assert cls is DIST and cls.family == "offline" and cls.needs_teacher and cls.Options is DISTOptions
    assert cls.recipe_epochs == 240
    assert dataclasses.asdict(DISTOptions()) == {"ce_weight": 1.0, "beta": 2.0, "gamma": 2.0, "temperature": 4.0}
    assert build_options(cls, {}, "dist") == DISTOptions()
    assert "240-epoch" in short_run_warning(cls, 10, {})
    m = make("dist")
    assert m.eval_logits(batch()[0]).keys() == {"net"}
    assert type(m.deploy_model()) is type(m.net)


@pytest.mark.parametrize("options, fragment", [
    ({"beta": -1.0}, "beta must be >= 0"),
    ({"gamma": -0.5}, "gamma must be >= 0"),
    ({"ce_weight": -1.0}, "ce_weight must be >= 0"),
    ({"ce_weight": 0.0, "beta": 0.0, "gamma": 0.0}, "at least one of ce_weight, beta, gamma"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"temperature": -2.0}, "temperature must be > 0"),
    ({"beta": float("nan")}, "options.beta: expected a finite number"),
    ({"temperature": float("inf")}, "options.temperature: expected a finite number"),
])
def test_bad_options_are_config_errors(options, fragment):
    with pytest.raises(ConfigError) as e:
        resolve_config({"method": "dist", "teacher": "t.pt", "options": options})
    assert fragment in str(e.value) and "method 'dist'" in str(e.value)


def test_options_built_directly_refuse_non_finite_values():
    for key in ("ce_weight", "beta", "gamma", "temperature"):
        with pytest.raises(ValueError, match=f"{key} must be a finite number"):
            DISTOptions(**{key: float("nan")}).validate()


def test_options_reach_the_method_through_the_config():
    cfg = resolve_config({"method": "dist", "teacher": "t.pt"},
                         overrides=["options.beta=1.5", "options.gamma=0", "options.temperature=1"])
    assert cfg.options == {"beta": 1.5, "gamma": 0, "temperature": 1}
    assert build_options(DIST, cfg.options, "dist") == DISTOptions(beta=1.5, gamma=0.0, temperature=1.0)
    m = make("dist", beta=1.5, gamma=0.0)
    assert set(m.training_step(*batch(), 0)) == {"loss_ce", "loss_inter"}


# ----------------------------------------------------------------------------- end to end
def test_two_step_recipe_end_to_end(tmp_path):
    teacher = fusionkd.train(method="baseline", epochs=20, out_dir=str(tmp_path), name="teacher", **TINY)
    best = teacher.run_dir / "best.pt"
    r = fusionkd.train(method="dist", teacher=str(best), epochs=2, out_dir=str(tmp_path), name="dist",
                       options={"temperature": 2}, **TINY)
    s = r.summary
    assert s["finished"] and s["family"] == "offline" and s["heads"] == ["net"] and s["deploy_model"] == "resnet20"
    assert_teacher_unchanged(r.run_dir / "last.pt", best)
    lines = [__import__("json").loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    assert all({"loss_ce", "loss_inter", "loss_intra"} <= set(m["train"]) for m in lines)
    assert all(math.isfinite(m["train"][k]) and m["train"][k] > 0 for m in lines for k in ("loss_inter", "loss_intra"))
    deploy = r.load_deploy_model()
    assert type(deploy).__name__ == type(make("dist").net).__name__
