"""The online methods as modules: which parameters each loss term trains, heads, deployment, heterogeneous
and m >= 3 peers, and batched (vmap) peers giving the same results as sequential ones. No engine needed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fusionkd.methods import METHODS, Method, MethodContext, count_parameters
from fusionkd.methods.dml import DML
from fusionkd.methods.ffl import FFL, FFLS
from fusionkd.methods.losses import kl_div
from fusionkd.methods.mfef import MFEF
from fusionkd.methods.one import ONE
from fusionkd.models import create_model

ONLINE = ["dml", "one", "ffl", "ffl_s", "mfef"]
HEADS = {
    "dml": {"peer1", "peer2", "ensemble"},
    "one": {"branch1", "branch2", "branch3", "gate"},
    "ffl": {"sub1", "sub2", "ensemble", "fused"},
    "ffl_s": {"sub1", "sub2", "ensemble", "fused"},
    "mfef": {"student1", "student2", "ensemble", "fused"},
}
LATE_EPOCH = 100  # past the ramp-up: every weight is 1, so no gradient is too small to see


def context(**kw) -> MethodContext:
    base = dict(model="resnet20", num_classes=10, in_chans=1, image_size=16, epochs=30)
    return MethodContext(**{**base, **kw})


def batch(n: int = 8, c: int = 1, s: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, c, s, s, generator=g), torch.randint(0, 10, (n,), generator=g)


def build(name: str, ctx: MethodContext | None = None, **options) -> Method:
    torch.manual_seed(0)
    cls = METHODS.get(name)
    return cls(ctx or context(), cls.Options(**options))


def trained_by(method: Method, term: torch.Tensor) -> dict[str, bool]:
    """Backward ``term`` alone; for each parameter name, whether it received a non-zero gradient."""
    method.zero_grad(set_to_none=True)
    term.backward(retain_graph=True)
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in method.named_parameters()}


def reached(flags: dict[str, bool], prefix: str, exclude: str | None = None) -> tuple[bool, bool]:
    """(any, all) parameters under ``prefix`` (optionally without those containing ``exclude``) trained."""
    vals = [v for n, v in flags.items() if n.startswith(prefix) and (exclude is None or exclude not in n)]
    assert vals, f"no parameter under {prefix!r}"
    return any(vals), all(vals)


# ------------------------------------------------------------------ gradient flow
def test_dml_gradient_flow():
    method = build("dml").train()
    x, y = batch()
    z = method.peers(x).logits
    # KL_1(p_1 -> p_2): peer 1 is the (detached) target, so only peer 2 learns
    flags = trained_by(method, kl_div(z[1], z[0], 1.0))
    assert reached(flags, "peers.members.1.") == (True, True)
    assert reached(flags, "peers.members.0.") == (False, False)
    terms = method.training_step(x, y, 0)
    for key in ("loss_ce", "loss_kl"):
        flags = trained_by(method, terms[key])
        assert reached(flags, "peers.members.0.")[1] and reached(flags, "peers.members.1.")[1], key


def test_one_gradient_flow():
    method = build("one").train()
    x, y = batch()
    terms = method.training_step(x, y, LATE_EPOCH)
    # KL(teacher -> branch): the gated teacher is detached, so the gate never learns from it
    flags = trained_by(method, terms["loss_kd"])
    assert reached(flags, "gate.") == (False, False)
    assert reached(flags, "peers.trunk.")[0]
    assert all(reached(flags, f"peers.members.{k}.")[0] for k in range(3))
    flags = trained_by(method, terms["loss_ce_gate"])
    assert reached(flags, "gate.")[1] and reached(flags, "peers.trunk.")[0]
    assert all(reached(flags, f"peers.members.{k}.")[0] for k in range(3))
    flags = trained_by(method, terms["loss_ce"])
    assert reached(flags, "gate.") == (False, False)


@pytest.mark.parametrize("name", ["ffl", "ffl_s", "mfef"])
def test_fusion_methods_gradient_flow(name: str):
    method = build(name, peer_kl=1.0) if name == "mfef" else build(name)
    method.train()
    x, y = batch()
    terms = method.training_step(x, y, LATE_EPOCH)
    members = [f"peers.members.{k}." for k in range(2)]
    fc = "head.fc"  # a sub-network's classifier only shapes z_k, a detached target in the fusion terms
    # sum_k CE(z_k) and KL(z_f -> z_k): sub-networks only; z_f is a detached target
    for key in ("loss_ce", "loss_kd_sub"):
        flags = trained_by(method, terms[key])
        assert reached(flags, "fusion.") == (False, False), key
        assert all(reached(flags, m)[0] and reached(flags, m + fc)[1] for m in members), key
        if name == "mfef":
            assert reached(flags, "post.") == (False, False), key
    # CE(z_f) and KL(z_e -> z_f): the fusion module and, through the undetached maps, the sub-networks
    for key in ("loss_ce_fused", "loss_kd_fused"):
        flags = trained_by(method, terms[key])
        assert reached(flags, "fusion.")[1], key
        assert all(reached(flags, m, exclude=fc)[0] for m in members), key
        assert all(reached(flags, m + fc) == (False, False) for m in members), key
        if name == "mfef":
            assert reached(flags, "post.")[0], key
    if name == "ffl_s":
        for key in terms:
            assert reached(trained_by(method, terms[key]), "peers.trunk.")[0], key
    if name == "mfef":  # DML's peer terms: students only
        flags = trained_by(method, terms["loss_kl_peer"])
        assert reached(flags, "fusion.") == (False, False) and reached(flags, "post.") == (False, False)
        assert all(reached(flags, m)[0] for m in members)


# ------------------------------------------------------------------ heads and deployment
@pytest.mark.parametrize("name", ONLINE)
def test_heads_and_deploy(name: str):
    method = build(name).train()
    x, y = batch()
    terms = method.training_step(x, y, 0)  # moves the BN statistics away from their initial values
    assert all(v.ndim == 0 and torch.isfinite(v) for v in terms.values())
    method.eval()
    with torch.inference_mode():
        heads = method.eval_logits(x)
    assert set(heads) == HEADS[name]
    assert all(v.shape == (8, 10) for v in heads.values())

    peer_heads = sorted(h for h in heads if h[-1].isdigit())
    method.on_validation({**{h: 50.0 for h in heads}, peer_heads[-1]: 60.0})  # the last peer is best
    assert method.deploy_head == peer_heads[-1]
    assert "best_peer" in method.state_dict()

    deploy = method.deploy_model().eval()
    fresh = create_model(method.deploy_model_name, num_classes=10, in_chans=1)
    assert type(deploy) is type(fresh)
    assert count_parameters(deploy) == count_parameters(fresh)
    fresh.load_state_dict(deploy.state_dict())
    fresh.eval()
    with torch.inference_mode():
        inside = method.eval_logits(x)[method.deploy_head]
        assert torch.allclose(deploy(x), inside, atol=1e-5)
        assert torch.allclose(fresh(x), inside, atol=1e-5)
    assert method.extra_parameters() > 0

    method.on_validation({})  # no validation split: the choice is kept
    assert method.deploy_head == peer_heads[-1]


def test_shared_trunk_deploy_key_mapping():
    """A branch becomes ``stages.2`` + ``head`` of the zoo net; the trunk gives ``stem`` + ``stages.0-1``."""
    method = build("ffl_s")
    method.on_validation({"sub1": 1.0, "sub2": 2.0})
    state = method.deploy_model().state_dict()
    assert torch.equal(state["stages.2.0.conv1.weight"], method.peers.members[1].stages[0][0].conv1.weight)
    assert torch.equal(state["head.fc.weight"], method.peers.members[1].head.fc.weight)
    assert torch.equal(state["stem.0.weight"], method.peers.trunk.stem[0].weight)
    assert not torch.equal(method.peers.members[0].head.fc.weight, method.peers.members[1].head.fc.weight)


def test_param_groups_fusion_weight_decay():
    method = build("mfef")
    groups = {g["name"]: g for g in method.param_groups(1e-4)}
    assert groups["networks"]["weight_decay"] == 1e-4 and groups["fusion"]["weight_decay"] == 1e-5
    fusion_ids = {id(p) for p in groups["fusion"]["params"]}
    assert fusion_ids == {id(p) for p in [*method.fusion.parameters(), *method.post.parameters()]}
    every = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in method.parameters())
    assert FFL.recipe == {"nesterov": True, "weight_decay": 1e-4} and FFLS.recipe == FFL.recipe


# ------------------------------------------------------------------ peers: heterogeneous, m = 3, errors
def test_heterogeneous_ffl_resnet32_wrn_16_2():
    ctx = context(model="resnet32", models=["resnet32", "wrn_16_2"], in_chans=3, image_size=32)
    method = build("ffl", ctx).train()
    assert method.fusion.in_channels == [64, 128] and method.fusion.out_channels == 128
    x, y = batch(4, 3, 32)
    terms = method.training_step(x, y, 0)
    assert all(torch.isfinite(v) for v in terms.values())
    method.on_validation({"sub1": 10.0, "sub2": 20.0})
    assert method.deploy_model_name == "wrn_16_2"
    deploy = method.deploy_model().eval()
    assert type(deploy) is type(create_model("wrn_16_2"))
    method.eval()
    with torch.inference_mode():
        assert torch.allclose(deploy(x), method.eval_logits(x)["sub2"], atol=1e-5)


def test_mismatched_ffl_pair_errors_clearly():
    ctx = context(model="resnet20", models=["resnet20", "vgg8"], in_chans=3, image_size=32)
    expected = r"resnet20 gives 64x8x8 \(stride 4\), vgg8 gives 512x4x4 \(stride 8\)"
    with pytest.raises(ValueError, match=expected):
        build("ffl", ctx)


def test_three_peers():
    x, y = batch()
    method = build("ffl", peers=3).train()
    assert method.fusion.in_channels == [64, 64, 64]
    terms = method.training_step(x, y, 0)
    assert all(torch.isfinite(v) for v in terms.values())
    method.eval()
    assert set(method.eval_logits(x)) == {"sub1", "sub2", "sub3", "ensemble", "fused"}
    dml = build("dml", peers=3).eval()
    with torch.no_grad():
        z = dml.peers(x).logits
        pairs = [kl_div(z[k], z[j], 1.0) for k in range(3) for j in range(3) if j != k]
        assert torch.allclose(dml.training_step(x, y, 0)["loss_kl"], sum(pairs) / 2)


def test_peer_count_errors():
    with pytest.raises(ValueError, match="disagrees with the 2 networks"):
        DML(context(models=["resnet20", "resnet32"]), DML.Options(peers=3))
    with pytest.raises(ValueError, match="at least 2 networks"):
        DML(context(models=["resnet20"]))
    with pytest.raises(ValueError, match="shared trunk needs one architecture"):
        MFEF(context(models=["resnet20", "resnet32"]), MFEF.Options(shared_trunk=True))
    assert not getattr(ONE, "accepts_models", False) and not getattr(FFLS, "accepts_models", False)


# ------------------------------------------------------------------ batched peers == sequential peers
BATCHED_CASES = [("dml", {}), ("ffl_s", {}), ("mfef", {"peer_kl": 1.0}), ("one", {})]


@pytest.mark.parametrize("name,options", BATCHED_CASES, ids=[c[0] for c in BATCHED_CASES])
def test_batched_peers_match_sequential(name: str, options: dict):
    seq = build(name, **options).train()
    bat = copy.deepcopy(seq)
    bat.peers.batched = True
    x, y = batch()
    losses = {}
    for tag, method in (("seq", seq), ("bat", bat)):
        method.zero_grad(set_to_none=True)
        terms = method.training_step(x, y, LATE_EPOCH)
        sum(terms.values()).backward()
        losses[tag] = terms
    for key in losses["seq"]:
        assert torch.allclose(losses["seq"][key], losses["bat"][key], rtol=1e-4, atol=1e-5), key
    for (n, p), q in zip(seq.named_parameters(), bat.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-5), n
    for (n, b), c in zip(seq.named_buffers(), bat.buffers()):
        assert torch.allclose(b.float(), c.float(), rtol=1e-4, atol=1e-6), n  # BN running statistics
    seq.eval()
    bat.eval()
    with torch.inference_mode():
        a, b = seq.eval_logits(x), bat.eval_logits(x)
    assert all(torch.allclose(a[h], b[h], atol=1e-5) for h in a)


def test_heterogeneous_peers_run_sequentially_when_batched():
    ctx = context(models=["resnet20", "wrn_16_1"])
    method = build("dml", ctx, batched_peers=True).train()
    x, y = batch()
    assert not method.peers.uniform
    assert torch.isfinite(method.training_step(x, y, 0)["loss_kl"])


def test_method_stays_a_plain_module():
    """The peers' backbones are registered once (no duplicated parameters through split or deploy)."""
    for name in ONLINE:
        method = build(name)
        names = [n for n, _ in method.named_parameters(remove_duplicate=False)]
        assert len(names) == len({id(p) for p in method.parameters()}), name
        assert isinstance(method, nn.Module)


def test_batched_peers_under_bf16_autocast_compute_in_float32():
    """Autocast does not reach inside vmap, so the batched branches run in float32 (with a warning)
    even when the shared trunk hands them a bf16 map."""
    method = build("one", batched_peers=True).train()
    x, y = batch()
    with pytest.warns(UserWarning, match="float32 inside vmap"), torch.autocast("cpu", dtype=torch.bfloat16):
        terms = method.training_step(x, y, 0)
    assert all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert method.peers.members[0].head.fc.weight.grad is not None
