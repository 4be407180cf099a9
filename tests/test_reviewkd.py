"""``reviewkd`` (Chen et al., CVPR 2021): the HCL against hand computation and a re-implementation of the
authors' formula (mdistiller), the ABF fusion order and shapes, the warm-up, what one step trains, option
checks, and tiny end-to-end runs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from test_offline_engine import assert_option_refused, assert_teacher_unchanged, spy_teacher, two_step_cli

from fusionkd.engine.checkpoint import load_checkpoint
from fusionkd.engine.config import build_options, resolve_config
from fusionkd.methods import METHODS, MethodContext, Teacher
from fusionkd.methods._offline import warmup_factor
from fusionkd.methods.reviewkd import ABF, ReviewKDOptions, hcl_loss, review_fuse
from fusionkd.models import create_model


# ----------------------------------------------------------------------------- HCL by hand
def test_hcl_matches_hand_computation():
    # level 1: a 4x4 map 0..15 against zeros
    #   full MSE = (0^2 + ... + 15^2) / 16 = 1240 / 16 = 77.5
    #   size 4: skipped (not smaller than the map)
    #   size 2 (weight 1/2): block means 2.5, 4.5, 10.5, 12.5 -> (6.25 + 20.25 + 110.25 + 156.25) / 4 = 73.25
    #   size 1 (weight 1/4): mean 7.5 -> 56.25
    #   (77.5 + 0.5 * 73.25 + 0.25 * 56.25) / 1.75
    s1, t1 = torch.arange(16.0).view(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    level1 = (77.5 + 0.5 * 73.25 + 0.25 * 56.25) / 1.75
    assert hcl_loss([s1], [t1]).item() == pytest.approx(level1)
    # level 2: a 2x2 map (1, 2, 3, 4) against ones: differences 0, 1, 2, 3
    #   full MSE = 14 / 4 = 3.5; sizes 4 and 2 skipped; size 1 gets the first halved weight 1/2: 1.5^2 = 2.25
    s2, t2 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]), torch.ones(1, 1, 2, 2)
    level2 = (3.5 + 0.5 * 2.25) / 1.5
    # level 3: a 1x1 map: no pooled size is smaller, the plain MSE
    s3, t3 = torch.full((1, 2, 1, 1), 3.0), torch.tensor([[[[1.0]], [[2.0]]]])
    level3 = (4.0 + 1.0) / 2
    assert hcl_loss([s1, s2, s3], [t1, t2, t3]).item() == pytest.approx(level1 + level2 + level3)
    with pytest.raises(ValueError, match="same shape"):
        hcl_loss([s1], [t2])
    with pytest.raises(ValueError, match="matching"):
        hcl_loss([s1, s2], [t1])


def _mdistiller_hcl(fstudent, fteacher):
    """Our re-writing of ``hcl_loss`` of mdistiller/distillers/ReviewKD.py."""
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt, tot = 1.0, 1.0
        for lvl in [4, 2, 1]:
            if lvl >= h:
                continue
            cnt /= 2.0
            loss += F.mse_loss(F.adaptive_avg_pool2d(fs, (lvl, lvl)), F.adaptive_avg_pool2d(ft, (lvl, lvl))) * cnt
            tot += cnt
        loss_all = loss_all + loss / tot
    return loss_all


def test_hcl_matches_a_reimplementation_of_mdistillers_formula():
    g = torch.Generator().manual_seed(11)
    shapes = [(3, 16, 32, 32), (3, 32, 16, 16), (3, 64, 8, 8), (3, 64, 7, 7), (3, 64, 3, 3), (3, 64, 1, 1)]
    s = [torch.randn(*sh, generator=g) for sh in shapes]
    t = [torch.randn(*sh, generator=g) for sh in shapes]
    ref = _mdistiller_hcl([x.double() for x in s], [x.double() for x in t])
    assert hcl_loss(s, t).item() == pytest.approx(ref.item(), rel=1e-5)
    # the teacher side is detached
    sg = [x.clone().requires_grad_() for x in s]
    tg = [x.clone().requires_grad_() for x in t]
    hcl_loss(sg, tg).backward()
    assert all(x.grad is not None for x in sg) and all(x.grad is None for x in tg)


# ----------------------------------------------------------------------------- ABF
def test_abf_shapes_and_attention():
    torch.manual_seed(0)
    deepest = ABF(8, 6, 5, fuse=False)
    assert deepest.att_conv is None
    out, res = deepest(torch.randn(2, 8, 1, 1), out_size=(1, 1))
    assert out.shape == (2, 5, 1, 1) and res.shape == (2, 6, 1, 1)
    fuse = ABF(4, 6, 7, fuse=True)
    out, res2 = fuse(torch.randn(2, 4, 8, 8), res, (8, 8))
    assert out.shape == (2, 7, 8, 8) and res2.shape == (2, 6, 8, 8)
    # a size change to the teacher's map: the fused map (and residual) take the teacher's size
    out, res3 = fuse(torch.randn(2, 4, 8, 8), res, (4, 4))
    assert out.shape == (2, 7, 4, 4) and res3.shape == (2, 6, 4, 4)
    with pytest.raises(ValueError, match="residual"):
        fuse(torch.randn(2, 4, 8, 8))


def test_fusion_runs_deepest_first_and_carries_the_residual_up():
    torch.manual_seed(1)
    chans_in, chans_out, sizes = [4, 8, 16, 16], [3, 5, 7, 9], [(16, 16), (8, 8), (4, 4), (1, 1)]
    abfs = torch.nn.ModuleList(ABF(ci, 6, co, fuse=i < 3) for i, (ci, co) in enumerate(zip(chans_in, chans_out)))
    abfs.eval()
    levels = [torch.randn(2, c, *sz) for c, sz in zip(chans_in, sizes)]
    outs = review_fuse(abfs, levels, sizes)
    assert [tuple(o.shape) for o in outs] == [(2, co, *sz) for co, sz in zip(chans_out, sizes)]
    # by hand, deepest first, each level fusing the residual of the one below
    o3, r = abfs[3](levels[3], None, sizes[3])
    o2, r = abfs[2](levels[2], r, sizes[2])
    o1, r = abfs[1](levels[1], r, sizes[1])
    o0, _ = abfs[0](levels[0], r, sizes[0])
    for got, want in zip(outs, [o0, o1, o2, o3]):
        assert torch.allclose(got, want)
    # the shallowest output depends on the deepest input (the review path), the deepest not on the shallowest
    changed = [levels[0], levels[1], levels[2], levels[3] + 1.0]
    assert not torch.allclose(review_fuse(abfs, changed, sizes)[0], outs[0])
    changed = [levels[0] + 1.0] + levels[1:]
    assert torch.allclose(review_fuse(abfs, changed, sizes)[3], outs[3])


# ----------------------------------------------------------------------------- warm-up
def test_warmup_counts_epochs_from_one_as_mdistiller_does():
    assert warmup_factor(0, 20) == pytest.approx(1 / 20)
    assert warmup_factor(9, 20) == pytest.approx(0.5)
    assert warmup_factor(19, 20) == 1.0
    assert warmup_factor(30, 20) == 1.0
    assert warmup_factor(0, 0) == 1.0


# ----------------------------------------------------------------------------- what one step trains
def _make(student="resnet20", teacher_name="resnet32", in_chans=1, size=28, **options):
    torch.manual_seed(0)
    teacher = create_model(teacher_name, num_classes=10, in_chans=in_chans)
    with torch.no_grad():  # non-trivial BN statistics, as a trained teacher has
        teacher.train()
        teacher(torch.randn(8, in_chans, size, size))
    teacher.eval()
    ctx = MethodContext(model=student, num_classes=10, in_chans=in_chans, image_size=size, epochs=10,
                        teacher=Teacher(teacher, teacher_name, {}))
    return METHODS.get("reviewkd")(ctx, ReviewKDOptions(**options))


@pytest.mark.parametrize("teacher_name", ["resnet20", "resnet32"])
def test_one_step_trains_student_and_abfs_only(teacher_name):
    m = _make(teacher_name=teacher_name)
    m.train()
    teacher_before = copy.deepcopy(m.teacher.state_dict())
    seen = spy_teacher(m)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)
    terms = m.training_step(x, y, epoch=0)
    assert set(terms) == {"loss_ce", "loss_review"} and terms["loss_review"].item() > 0
    sum(terms.values()).backward()
    assert len(seen) == 1 and all(not t.requires_grad and t.grad_fn is None for t in seen[0][0])
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    assert all(torch.equal(v, m.teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert not m.teacher.training
    for part in (m.net, m.abfs):
        params = list(part.parameters())
        assert params and all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert len(m.abfs) == 4 and m.abfs[-1].att_conv is None and m.mid_channels == 64
    assert all(p.grad.abs().sum() > 0 for p in m.abfs.parameters())
    # every ABF parameter is in the optimizer; no teacher parameter is
    grouped = {id(p) for g in m.param_groups(5e-4) for p in g["params"]}
    assert all(id(p) in grouped for p in m.abfs.parameters())
    assert not any(id(p) in grouped for p in m.teacher.parameters())
    # the review term alone reaches the student's stem and stages
    m.zero_grad(set_to_none=True)
    m.training_step(x, y, epoch=0)["loss_review"].backward()
    for part in (m.net.stem, m.net.stages[0], m.net.stages[-1]):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_variants_without_pooled_level_and_without_review():
    m = _make(pooled_level=False, max_mid_channels=32)
    assert len(m.abfs) == 3 and m.mid_channels == 32
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([1, 2])
    assert set(m.training_step(x, y, 0)) == {"loss_ce", "loss_review"}
    m = _make(review_weight=0.0)
    assert m.abfs is None and set(m.training_step(x, y, 0)) == {"loss_ce"}


def test_warmup_scales_only_the_review_term():
    m = _make()
    m.eval()  # fixed BN, so that two steps see the same maps
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([1, 2])
    with torch.no_grad():
        full = m.training_step(x, y, 30)
        for epoch, factor in [(0, 0.05), (9, 0.5), (19, 1.0)]:
            terms = m.training_step(x, y, epoch)
            assert terms["loss_ce"].item() == pytest.approx(full["loss_ce"].item())
            assert terms["loss_review"].item() == pytest.approx(factor * full["loss_review"].item(), rel=1e-5)


def test_wrn_pair_one_step():
    m = _make("wrn_16_2", "wrn_40_2", in_chans=3, size=32)
    m.train()
    terms = m.training_step(torch.randn(2, 3, 32, 32), torch.tensor([0, 5]), epoch=3)
    sum(terms.values()).backward()
    assert torch.isfinite(terms["loss_review"]) and m.mid_channels == 128
    assert all(p.grad is not None for p in m.abfs.parameters())


def test_soft_targets():
    m = _make()
    soft = 0.3 * F.one_hot(torch.tensor([1, 2]), 10).float() + 0.7 * F.one_hot(torch.tensor([4, 2]), 10).float()
    terms = m.training_step(torch.randn(2, 1, 28, 28), soft, 0)
    assert torch.isfinite(terms["loss_ce"])


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("options, fragment", [
    ({"review_weight": -1.0}, "review_weight must be >= 0"),
    ({"ce_weight": -1.0}, "ce_weight must be >= 0"),
    ({"ce_weight": 0.0}, "ce_weight must be > 0"),
    ({"warmup_epochs": -1}, "warmup_epochs must be >= 0"),
    ({"max_mid_channels": 0}, "max_mid_channels must be >= 1"),
])
def test_bad_options_are_refused_naming_the_option(options, fragment):
    assert_option_refused("reviewkd", ReviewKDOptions, options, fragment)


def test_defaults_registry_and_config_overrides():
    cls = METHODS.get("reviewkd")
    assert cls.family == "offline" and cls.needs_teacher and cls.Options is ReviewKDOptions
    assert cls.recipe_epochs == 240
    d = ReviewKDOptions()
    assert (d.ce_weight, d.review_weight, d.warmup_epochs, d.max_mid_channels, d.pooled_level) == (
        1.0, 1.0, 20, 512, True)
    assert build_options(cls, {}, "reviewkd") == d
    cfg = resolve_config({"method": "reviewkd", "teacher": "t.pt"},
                         overrides=["options.review_weight=5", "options.warmup_epochs=5"])
    assert cfg.options == {"review_weight": 5, "warmup_epochs": 5}
    assert build_options(cls, cfg.options, "reviewkd") == ReviewKDOptions(review_weight=5.0, warmup_epochs=5)


# ----------------------------------------------------------------------------- end to end
def test_cli_two_step_recipe_with_reviewkd(tmp_path):
    run, best = two_step_cli(tmp_path, "reviewkd", "options.warmup_epochs=2")
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["config"]["method"] == "reviewkd" and ckpt["config"]["options"] == {"warmup_epochs": 2}
    assert any(k.startswith("abfs.") for k in ckpt["method_state"])
    assert_teacher_unchanged(run / "last.pt", best)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert {"loss_ce", "loss_review"} <= set(line["train"])
        assert line["train"]["loss_review"] > 0 and set(line["val"]) == {"net"}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["family"] == "offline" and summary["deploy_model"] == "resnet20"
    assert summary["method_extras"]["review"] == {"stage_levels": 3, "pooled_level": True, "mid_channels": 64}
