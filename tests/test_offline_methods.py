"""The offline methods built directly (no engine): gradient flow of every loss term, the frozen teacher,
MFKD's two stages, taps / alignment / fusion variants, heads, deploy network and option checks."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from fusionkd.engine.config import ConfigError, resolve_config
from fusionkd.methods import METHODS, Method, MethodContext, Teacher
from fusionkd.methods.mfkd import MFKDOptions, resolve_taps
from fusionkd.models import create_model

OFFLINE = ["kd", "fitnet", "at", "mfkd"]


def make(method: str, teacher: str = "resnet32", epochs: int = 10, student: str = "resnet20", **options) -> Method:
    torch.manual_seed(0)
    t = create_model(teacher, num_classes=10, in_chans=1)
    # a teacher with non-trivial BN statistics, as a trained one has
    with torch.no_grad():
        t.train()
        t(torch.randn(8, 1, 28, 28))
    t.eval()
    ctx = MethodContext(model=student, num_classes=10, in_chans=1, image_size=28, epochs=epochs,
                        teacher=Teacher(t, teacher, {"test_accuracy": 91.0, "path": "t.pt"}))
    cls = METHODS.get(method)
    return cls(ctx, cls.Options(**options))


def batch(n: int = 4, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def groups(m: Method) -> dict[str, list[nn.Parameter]]:
    """Named parameter sets whose gradients the tests inspect."""
    out = {
        "student_stem": list(m.net.stem.parameters()),
        "student_last_stage": list(m.net.stages[-1].parameters()),
        "student_fc": list(m.net.head.parameters()),
        "teacher": list(m.teacher.parameters()),
    }
    if hasattr(m, "connector"):
        out["connector"] = list(m.connector.parameters())
    if hasattr(m, "fusion"):
        out["fusion"] = list(m.fusion.parameters())
    return out


def reached(m: Method, term: str, epoch: int) -> set[str]:
    """Back-propagate one loss term alone; the parameter sets that received a non-zero gradient."""
    m.zero_grad(set_to_none=True)
    m.on_epoch_start(epoch)
    m.train()
    x, y = batch()
    m.training_step(x, y, epoch)[term].backward()
    hit = set()
    for name, params in groups(m).items():
        if any(p.grad is not None and p.grad.abs().sum() > 0 for p in params):
            hit.add(name)
    assert all(p.grad is None for p in m.teacher.parameters())
    return hit


STUDENT = {"student_stem", "student_last_stage", "student_fc"}


# ----------------------------------------------------------------------------- gradient flow
@pytest.mark.parametrize(
    "method, term, epoch, expected",
    [
        ("kd", "loss_ce", 0, STUDENT),
        ("kd", "loss_kd", 0, STUDENT),
        ("fitnet", "loss_ce", 0, STUDENT),
        # the hint reaches the student up to the guided (middle) stage and the connector, nothing after
        ("fitnet", "loss_hint", 0, {"student_stem", "connector"}),
        ("at", "loss_ce", 0, STUDENT),
        ("at", "loss_at", 0, {"student_stem", "student_last_stage"}),
        ("mfkd", "loss_fusion_ce", 0, {"fusion"}),
        ("mfkd", "loss_ce", 0, STUDENT),
        ("mfkd", "loss_kd", 0, STUDENT),
        ("mfkd", "loss_ce", 1, STUDENT),
        ("mfkd", "loss_kd", 1, STUDENT),
        ("mfkd", "loss_feat", 1, {"student_stem", "student_last_stage", "connector"}),
    ],
)
def test_each_term_reaches_exactly_these_parameters(method, term, epoch, expected):
    assert reached(make(method), term, epoch) == expected


def test_fitnet_hint_stops_at_the_guided_stage():
    m = make("fitnet")
    reached(m, "loss_hint", 0)
    assert m.student_stage == 1 and m.teacher_stage == 1
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.net.stages[1].parameters())
    assert all(p.grad is None for p in m.net.stages[2].parameters())


def test_mfkd_fusion_term_reaches_every_fusion_part_and_stage_two_terms_none():
    m = make("mfkd", align="conv", fusion="weighted")
    reached(m, "loss_fusion_ce", 0)
    for name, p in m.fusion.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # in the student stage the fusion module is frozen: nothing reaches it, from any term
    for term in ("loss_ce", "loss_kd", "loss_feat"):
        reached(m, term, 1)
        assert all(p.grad is None for p in m.fusion.parameters())
        assert all(not p.requires_grad for p in m.fusion.parameters())


@pytest.mark.parametrize("method, options", [
    ("kd", {}),
    ("kd", {"ce_weight": 0.0}),
    ("fitnet", {}),
    ("fitnet", {"hint_weight": 0.0}),
    ("at", {}),
    ("mfkd", {}),
    ("mfkd", {"fusion_stage_student": "wait"}),
    ("mfkd", {"fusion_stage_student": "ce", "kd_weight": 0.0}),
    ("mfkd", {"feat_weight": 0.0, "fusion": "weighted", "align": "conv"}),
])
def test_every_trainable_parameter_takes_part_in_every_stage(method, options):
    """What DistributedDataParallel without find_unused_parameters needs: in each stage, every parameter
    that requires gradients receives one from the summed loss, and nothing else does."""
    m = make(method, **options)
    in_optimizer = {id(p) for g in m.param_groups(5e-4) for p in g["params"]}
    assert not in_optimizer & {id(p) for p in m.teacher.parameters()}
    for epoch in (0, 1):
        m.zero_grad(set_to_none=True)
        m.on_epoch_start(epoch)
        m.train()
        x, y = batch()
        sum(m.training_step(x, y, epoch).values()).backward()
        for name, p in m.named_parameters():
            assert (p.grad is not None) == p.requires_grad, (epoch, name)
            assert not p.requires_grad or id(p) in in_optimizer, name


def test_mfkd_optimizer_holds_every_stage_part_from_the_start():
    m = make("mfkd")
    m.on_epoch_start(1)  # even when built after the switch (the engine builds it before the first epoch)
    params = {id(p) for g in m.param_groups(5e-4) for p in g["params"]}
    for part in (m.net, m.connector, m.fusion):
        assert all(id(p) in params for p in part.parameters())


# ----------------------------------------------------------------------------- the teacher never changes
def sgd_steps(m: Method, epochs: list[int], steps: int = 2) -> None:
    opt = torch.optim.SGD(m.param_groups(5e-4), lr=0.1, momentum=0.9)
    for epoch in epochs:
        m.on_epoch_start(epoch)
        m.train()
        for s in range(steps):
            x, y = batch(seed=10 * epoch + s)
            loss = sum(m.training_step(x, y, epoch).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


@pytest.mark.parametrize("method", OFFLINE)
def test_teacher_weights_and_bn_statistics_never_change(method):
    m = make(method)
    before = copy.deepcopy(m.teacher.state_dict())
    student_before = copy.deepcopy(m.net.state_dict())
    sgd_steps(m, [0, 1])
    m.train()
    assert m.teacher.training is False and all(not mod.training for mod in m.teacher.modules())
    assert all(not p.requires_grad for p in m.teacher.parameters())
    after = m.teacher.state_dict()
    assert before.keys() == after.keys()
    for k in before:  # weights, BN running mean/var and num_batches_tracked
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(student_before[k], v) for k, v in m.net.state_dict().items())
    assert not any(p is q for p in m.teacher.parameters() for g in m.param_groups(0.0) for q in g["params"])


def test_mfkd_fusion_trains_in_its_stage_then_never_changes():
    m = make("mfkd", epochs=20)  # fusion stage: 10 % of 20 = epochs 0 and 1
    assert m.fusion_epochs == 2
    start = copy.deepcopy(m.fusion.state_dict())
    sgd_steps(m, [0, 1])  # momentum buffers exist for the fusion parameters after this
    trained = copy.deepcopy(m.fusion.state_dict())
    assert any(not torch.equal(start[k], trained[k]) for k in start)
    student = copy.deepcopy(m.net.state_dict())
    sgd_steps(m, [2, 3])
    assert m.fusion.training is False
    for k, v in m.fusion.state_dict().items():  # weights and BN statistics
        assert torch.equal(trained[k], v), k
    assert any(not torch.equal(student[k], v) for k, v in m.net.state_dict().items())


def test_mfkd_wait_leaves_the_student_untouched_during_the_fusion_stage():
    m = make("mfkd", fusion_stage_student="wait")
    before = copy.deepcopy(m.net.state_dict())
    sgd_steps(m, [0])
    for k, v in m.net.state_dict().items():
        assert torch.equal(before[k], v), k
    x, y = batch()
    terms = m.training_step(x, y, 0)
    assert terms["loss_ce"].item() == 0.0 and terms["loss_kd"].item() == 0.0 and terms["loss_fusion_ce"] > 0


def test_mfkd_ce_mode_has_no_kd_during_the_fusion_stage_only():
    m = make("mfkd", fusion_stage_student="ce")
    m.train()
    x, y = batch()
    assert m.training_step(x, y, 0)["loss_kd"].item() == 0.0
    m.on_epoch_start(1)
    assert m.training_step(x, y, 1)["loss_kd"].item() > 0.0


def test_mfkd_feature_only_variant_has_no_kd_term():
    m = make("mfkd", kd_weight=0.0)
    m.on_epoch_start(1)
    m.train()
    x, y = batch()
    assert set(m.training_step(x, y, 1)) == {"loss_ce", "loss_feat", "loss_fusion_ce"}


# ----------------------------------------------------------------------------- taps, alignment, fusion
def test_default_and_explicit_taps():
    assert resolve_taps(None, 3) == [0, 1, 2]
    assert resolve_taps(None, 4) == [0, 2, 3]
    assert resolve_taps(None, 2) == [0, 1]
    assert resolve_taps([-1, 1], 4) == [1, 3]
    with pytest.raises(ValueError, match="do not exist: the teacher has 3 stages"):
        resolve_taps([0, 3], 3)
    with pytest.raises(ValueError, match="twice"):
        resolve_taps([2, -1], 3)


@pytest.mark.parametrize("teacher, taps, deep_shape", [
    ("resnet32", None, (64, 7, 7)),    # 3 stages: 28 -> 28, 14, 7
    ("vgg8", None, (512, 4, 4)),       # 4 stages: 28 -> 28, 14, 7, 4 (odd 7 -> 4)
    ("vgg8", [0, 1], (128, 14, 14)),   # the deepest tap need not be the last stage
])
@pytest.mark.parametrize("align", ["pool", "conv"])
@pytest.mark.parametrize("fusion", ["concat", "weighted"])
def test_taps_alignment_and_fusion_variants(teacher, taps, deep_shape, align, fusion):
    m = make("mfkd", teacher=teacher, taps=taps, align=align, fusion=fusion)
    m.train()
    x, y = batch(n=2)
    with torch.no_grad():
        t_maps = m.teacher.forward_stages(x)
        fused = m.fusion([t_maps[i] for i in m.taps])
    assert fused.shape == (2, *deep_shape)
    assert (fused >= 0).all()
    terms = m.training_step(x, y, 0)
    terms["loss_fusion_ce"].backward()
    assert all(p.grad is not None for p in m.fusion.parameters())
    m.on_epoch_start(1)
    terms = m.training_step(x, y, 1)  # the student's 7x7 map is resized to the fused map's size
    assert torch.isfinite(terms["loss_feat"]) and terms["loss_feat"] > 0


def test_conv_alignment_has_one_strided_block_per_halving():
    m = make("mfkd", teacher="vgg8", align="conv")  # taps strides 1, 4, 8 -> 3, 1, 0 halvings
    convs = [sum(isinstance(x, nn.Conv2d) for x in a.down) for a in m.fusion.aligners]
    assert convs == [3, 1, 0]


# ----------------------------------------------------------------------------- heads, deploy, state
@pytest.mark.parametrize("method", OFFLINE)
def test_deploy_model_is_the_bare_student(method):
    m = make(method)
    sgd_steps(m, [0, 1], steps=1)
    m.eval()
    dep = m.deploy_model()
    fresh = create_model("resnet20", num_classes=10, in_chans=1)
    assert type(dep) is type(fresh) and m.deploy_model_name == "resnet20" and m.deploy_head == "net"
    assert sum(p.numel() for p in dep.parameters()) == sum(p.numel() for p in fresh.parameters())
    fresh.load_state_dict(dep.state_dict())
    fresh.eval()
    x, _ = batch()
    with torch.inference_mode():
        heads = m.eval_logits(x)
        assert torch.allclose(fresh(x), heads["net"], atol=1e-6)
    assert m.extra_parameters() >= sum(p.numel() for p in m.teacher.parameters())
    assert m.summary_extras()["teacher"]["recorded_test_accuracy"] == 91.0


@pytest.mark.parametrize("method", ["kd", "fitnet", "at"])
def test_single_head_methods_report_the_student(method):
    m = make(method).eval()
    with torch.inference_mode():
        assert set(m.eval_logits(batch()[0])) == {"net"}


def test_mfkd_reports_fused_and_teacher_heads_until_the_fusion_head_is_final():
    m = make("mfkd", epochs=20)  # fusion epochs 0, 1
    x, _ = batch()
    for epoch, expected in [(0, {"net", "fused", "teacher"}), (1, {"net", "fused", "teacher"}), (2, {"net"})]:
        m.on_epoch_start(epoch)
        m.eval()
        with torch.inference_mode():
            heads = m.eval_logits(x)
        assert set(heads) == expected, epoch
        assert all(h.shape == (4, 10) for h in heads.values())
        m.on_validation({h: 10.0 * (epoch + 1) for h in heads})
    assert m.summary_extras()["fused_head_val_accuracy"] == 20.0
    # the flags are buffers: a rebuilt method (resume / eval) takes them from the state dict
    again = make("mfkd", epochs=20)
    again.eval()
    with torch.inference_mode():
        assert "fused" in again.eval_logits(x)
    again.load_state_dict(m.state_dict())
    with torch.inference_mode():
        assert set(again.eval_logits(x)) == {"net"}


def test_mfkd_first_evaluation_after_a_long_fusion_stage_still_reports_the_fusion_head():
    m = make("mfkd", epochs=20)
    m.on_epoch_start(4)  # e.g. eval_every=5: the first evaluation comes after the fusion stage
    m.eval()
    with torch.inference_mode():
        assert set(m.eval_logits(batch()[0])) == {"net", "fused", "teacher"}
    m.on_validation({"net": 1.0, "fused": 2.0, "teacher": 3.0})
    with torch.inference_mode():
        assert set(m.eval_logits(batch()[0])) == {"net"}


def test_mfkd_stage_length_is_kept_when_a_resumed_run_is_extended():
    m = make("mfkd", epochs=10)
    assert m.fusion_epochs == 1
    longer = make("mfkd", epochs=40)
    assert longer.fusion_epochs == 4
    longer.load_state_dict(m.state_dict())
    assert longer.fusion_epochs == 1


# ----------------------------------------------------------------------------- options and errors
@pytest.mark.parametrize("method, options, fragment", [
    ("kd", {"kd_weight": -1.0}, "kd_weight must be >= 0"),
    ("kd", {"kd_weight": 0.0, "ce_weight": 0.0}, "at least one of"),
    ("kd", {"temperature": 0.0}, "temperature must be > 0"),
    ("fitnet", {"hint_weight": -2.0}, "hint_weight must be >= 0"),
    ("at", {"at_weight": 0.0, "ce_weight": 0.0, "kd_weight": 0.0}, "at least one of"),
    ("at", {"ce_weight": 0.0}, "nothing would train the student's classifier"),
    ("fitnet", {"ce_weight": 0.0}, "nothing would train the student's classifier"),
    ("mfkd", {"ce_weight": 0.0, "kd_weight": 0.0}, "nothing would train the student's classifier"),
    ("mfkd", {"align": "nearest"}, "align='nearest' is not accepted; choose one of: pool, conv"),
    ("mfkd", {"fusion": "sum"}, "choose one of: concat, weighted"),
    ("mfkd", {"fusion_stage_student": "kd"}, "choose one of: ce_kd, ce, wait"),
    ("mfkd", {"taps": []}, "at least one teacher stage"),
    ("mfkd", {"fusion_epochs": 0}, "fusion_epochs must be >= 1"),
    ("mfkd", {"taps": "0,1"}, "options.taps: expected list[int] | None"),
])
def test_bad_options_are_config_errors(method, options, fragment):
    with pytest.raises(ConfigError) as e:
        resolve_config({"method": method, "teacher": "t.pt", "options": options})
    assert fragment in str(e.value) and f"method {method!r}" in str(e.value)


def test_options_reach_the_method_through_the_config():
    cfg = resolve_config({"method": "mfkd", "teacher": "t.pt"},
                         overrides=["options.taps=[0,-1]", "options.align=conv", "options.feat_weight=10"])
    assert cfg.options == {"taps": [0, -1], "align": "conv", "feat_weight": 10}


def test_construction_errors_are_clear():
    with pytest.raises(ValueError, match="trains its fusion module for 1 epoch"):
        make("mfkd", epochs=1)
    with pytest.raises(ValueError, match="stage 5 does not exist"):
        make("fitnet", student_stage=5)
    with pytest.raises(ValueError, match="taps .* do not exist"):
        make("mfkd", taps=[0, 4])
    ctx = MethodContext(model="resnet20", num_classes=10, in_chans=1, image_size=28, epochs=10)
    with pytest.raises(ValueError, match="pass --teacher CHECKPOINT"):
        METHODS.get("kd")(ctx, None)
    wrong = create_model("resnet20", num_classes=5, in_chans=1)
    ctx.teacher = Teacher(wrong, "resnet20", {})
    with pytest.raises(ValueError, match="predicts 5 classes"):
        METHODS.get("kd")(ctx, None)


def test_registry_entries_and_option_defaults():
    from fusionkd.engine.config import build_options
    from fusionkd.methods.at import ATOptions
    from fusionkd.methods.fitnet import FitNetOptions
    from fusionkd.methods.kd import KDOptions

    own = {"kd": KDOptions, "fitnet": FitNetOptions, "at": ATOptions, "mfkd": MFKDOptions}
    for name in OFFLINE:
        cls = METHODS.get(name)
        assert cls.family == "offline" and cls.needs_teacher
        assert cls.Options is own[name]  # the registry builds each method's own options, not another's
        assert build_options(cls, {}, name) == cls.Options()  # no options: the defaults, which validate
    # mfkd's defaults, as documented (docs/methods/offline.md, METHODS.md section 4)
    assert dataclasses.asdict(MFKDOptions()) == {
        "ce_weight": 1.0, "kd_weight": 1.0, "feat_weight": 50.0, "temperature": 4.0, "taps": None, "align": "pool",
        "fusion": "concat", "fusion_epochs": None, "fusion_stage_student": "ce_kd", "logit_std": False}
    assert build_options(METHODS.get("mfkd"), {"feat_weight": 10, "taps": [0, -1]}, "mfkd") == MFKDOptions(
        feat_weight=10.0, taps=[0, -1])
    # a method built without options uses those defaults: taps first/middle/last of the teacher's 3 stages,
    # a fusion stage of 10 % of the run (at least one epoch), a connector because feat_weight > 0
    m = make("mfkd", epochs=30)
    assert m.options == MFKDOptions() and m.taps == [0, 1, 2]
    assert int(m.fusion_stage_epochs) == 3 and m.connector is not None
    assert int(make("mfkd", epochs=4).fusion_stage_epochs) == 1
