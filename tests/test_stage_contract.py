"""The stage-map rule of the backbone contract (fusionkd.models.base): the map offered for each stage is the
tensor the next weight layer reads, i.e. post-activation on every network but MobileNetV2's linear
bottlenecks; on the pre-activation WRNs that is the next block's BN-ReLU, computed once and shared by the
method and the network; the raw stage outputs stay reachable."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from gradflow import batch, build_method, reached, under
from torch import nn

from fusionkd.methods.at import AT, ATOptions
from fusionkd.methods.base import MethodContext, Teacher
from fusionkd.methods.byot import BYOT
from fusionkd.methods.fmfsd import FMFSD
from fusionkd.methods.frskd import FRSKD
from fusionkd.models import HookBackbone, create_model, list_models, stage_maps
from fusionkd.models.wrn import WideStage

WRNS = [m for m in list_models() if m.startswith("wrn_")]
LINEAR_BOTTLENECK = {"mobilenetv2", "imagenet_mobilenet_v2"}  # signed stage maps by design


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    size = 64 if name.startswith("imagenet_") else 32
    return create_model(name, num_classes=10, in_chans=3), torch.randn(2, 3, size, size)


def _first_weight_input(module: nn.Module, run) -> torch.Tensor:
    """The input of the first Conv2d/Linear of ``module`` that runs while ``run()`` executes."""
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0]) if not seen else None)
             for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen[0]


@pytest.mark.parametrize("name", list_models())
def test_each_stage_map_is_what_the_next_weight_layer_reads(name):
    model, x = _model(name)
    model.eval()
    with torch.no_grad():
        maps = model.forward_stages(x)
        stages = list(model.stages)
        for i in range(len(stages) - 1):
            read = _first_weight_input(stages[i + 1], lambda: model(x))
            first = next(iter(stages[i + 1].children()), None)
            expect = first(maps[i]) if isinstance(first, nn.MaxPool2d) else maps[i]  # VGG: pool, then conv
            assert torch.equal(read, expect), f"{name} stage {i}"
        # the last map: what the head pools (directly, or through its own weighted ``pre``)
        read = _first_weight_input(model.head.pre if name in LINEAR_BOTTLENECK else model.head.fc,
                                   lambda: model(x))
        expect = maps[-1] if name in LINEAR_BOTTLENECK else torch.flatten(F.adaptive_avg_pool2d(maps[-1], 1), 1)
        assert torch.allclose(read, expect, atol=1e-6)
        assert torch.equal(model.forward_head(maps[-1]), model(x))
        if name not in LINEAR_BOTTLENECK:
            assert all(float(m.min()) >= 0 for m in maps), f"{name}: post-activation maps are non-negative"


@pytest.mark.parametrize("name", WRNS)
def test_wrn_maps_are_the_next_bn_relu_of_the_raw_sums(name):
    model, x = _model(name)
    model.eval()
    with torch.no_grad():
        maps, raw = stage_maps(model, x)
        assert all(torch.equal(a, b) for a, b in zip(raw, model.forward_stages(x, raw=True)))
        assert all(float(r.min()) < 0 for r in raw)  # the raw residual sums are signed
        bns = [model.stages[i + 1][0].bn1 for i in range(model.num_stages - 1)] + [model.head.pre[0]]
        for m, r, bn in zip(maps, raw, bns):
            assert torch.equal(m, F.relu(bn(r)))


def _classic_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The network as written before the contract: each stage applies its own BN-ReLU, the head its own."""
    x = model.stem(x)
    for stage in model.stages:
        for block in stage:
            x = block(x)
    return model.head(x)


@pytest.mark.parametrize("name", WRNS)
def test_sharing_the_activation_changes_nothing_in_the_network(name):
    """Train mode: same logits, same gradients, and BatchNorm statistics updated once, as the classic forward."""
    model, x = _model(name)
    y = torch.tensor([1, 7])
    ref = copy.deepcopy(model)
    model.train(), ref.train()
    maps = model.forward_stages(x)
    F.cross_entropy(model.forward_head(maps[-1]), y).backward()
    F.cross_entropy(_classic_forward(ref, x), y).backward()
    for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), n
    for (n, a), (_, b) in zip(model.named_buffers(), ref.named_buffers()):
        assert torch.equal(a, b), n  # includes num_batches_tracked == 1 for every BatchNorm
    assert all(int(m.num_batches_tracked) == 1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_wrn_keeps_its_state_dict_layout():
    """Same keys as before the contract (RepDistiller's layout): old checkpoints and weights still load."""
    model = create_model("wrn_16_2", num_classes=100, in_chans=3)
    keys = list(model.state_dict())
    assert "stages.1.0.bn1.weight" in keys and "head.pre.0.running_var" in keys
    assert all(isinstance(s, WideStage) for s in model.stages)
    assert sum(p.numel() for p in model.parameters()) == 703_284  # "0.70 M params at 100 classes"


def test_split_trunk_hands_the_raw_map_to_each_branch():
    model, x = _model("wrn_16_2")
    model.eval()
    trunk, tail = model.split(2)
    with torch.no_grad():
        raw = model.forward_stages(x, raw=True)
        assert torch.equal(trunk(x), raw[1])
        assert torch.equal(tail(trunk(x)), model(x))
        assert torch.equal(tail.forward_stages(trunk(x))[-1], model.forward_stages(x)[-1])


def test_adapted_modules_accept_raw_and_offer_their_hooked_outputs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    adapted = HookBackbone(net, ["1", "3"], "6", input_shape=(3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    a, b = adapted.forward_stages(x), adapted.forward_stages(x, raw=True)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    maps, raw = stage_maps(adapted, x)
    assert all(torch.equal(p, q) for p, q in zip(maps, raw))


def test_compiled_wrn_stages_take_the_shared_activation():
    """The activation is handed through ``__call__`` (stage(x, act)), so compiled stages stay compiled."""
    model, x = _model("wrn_16_1")
    calls = []
    for stage in model.stages:
        stage.register_forward_hook(lambda _m, args, _out: calls.append(len(args)))
    model.eval()
    with torch.no_grad():
        model(x)
    assert calls == [1, 2, 2]  # stage 0 reads the stem; stages 1, 2 get (x, act)


# ----------------------------------------------------------------------------- methods on a WRN
def test_frskd_attention_term_trains_the_activation_that_makes_the_maps():
    """On a WRN the AT term reaches the BN that turns each raw sum into its map (the next block's bn1 and
    the head's final BN), but no classifier weight; the self-teacher's CE does too (maps not detached)."""
    m = build_method(FRSKD, "wrn_16_2", 28, 1)
    x, y = batch()
    terms = m.losses(m.forward_all(x), y)
    acts = ["net.stages.1.0.bn1.", "net.stages.2.0.bn1.", "net.head.pre.0."]
    at = reached(m, terms["loss_at"])
    assert all(under(at, a) for a in acts) and not under(at, "net.head.fc.") and not under(at, "teacher.")
    ce_t = reached(m, terms["loss_ce_teacher"])
    assert all(under(ce_t, a) for a in acts) and not under(ce_t, "net.head.fc.")


@pytest.mark.parametrize("cls", [BYOT, FMFSD])
def test_branches_on_a_wrn_read_the_activated_maps(cls):
    """A branch after stage i reads relu(bn(sum_i)), so its CE trains that BN (the next block's bn1)."""
    m = build_method(cls, "wrn_16_2", 28, 1)
    x, y = batch()
    terms = m.losses(m.forward_all(x), y)
    ce_b = reached(m, terms["loss_ce_branches"])
    assert under(ce_b, "net.stages.1.0.bn1.") and under(ce_b, "net.stages.2.0.bn1.")
    assert not under(ce_b, "net.head.fc.")
    m.eval()
    with torch.no_grad():
        out = m.forward_all(x)
        assert torch.allclose(out.deep_logits, m.net(x), atol=1e-6)


def _at_method(maps: str) -> AT:
    torch.manual_seed(0)
    teacher = create_model("wrn_16_2", num_classes=10, in_chans=1).eval()
    ctx = MethodContext(model="wrn_16_1", num_classes=10, in_chans=1, image_size=28, epochs=10,
                        teacher=Teacher(teacher, "wrn_16_2", {}))
    return AT(ctx, ATOptions(maps=maps))


def test_at_reads_raw_maps_on_request():
    """``maps=raw`` (the AT authors' WRN code) attends to the raw sums, ``post`` to the contract's maps;
    both equal the loss written out on the maps of one forward (eval mode: the statistics stay put)."""
    x, y = batch()

    def phi(f):
        return F.normalize(f.float().pow(2).mean(1).flatten(1), dim=1)

    def by_hand(method, kind):
        s, t = stage_maps(method.net, x)[kind], stage_maps(method.teacher, x)[kind]
        return 1000 / 2 * sum((phi(a) - phi(b)).pow(2).mean() for a, b in zip(s, t))

    post, raw = _at_method("post").eval(), _at_method("raw").eval()
    with torch.no_grad():
        lp = post.training_step(x, y, 0)["loss_at"]
        lr = raw.training_step(x, y, 0)["loss_at"]
        assert torch.allclose(lp, by_hand(post, 0), rtol=1e-5)
        assert torch.allclose(lr, by_hand(raw, 1), rtol=1e-5)
        assert not torch.allclose(lp, lr, rtol=1e-3)
    with pytest.raises(ValueError, match="maps must be one of post, raw"):
        ATOptions(maps="pre").validate()


@pytest.mark.slow  # torch.compile: ~5 s
def test_compiled_wrn_matches_eager():
    """``compile=true`` on a WRN: the stages that take the shared activation run compiled and give the
    eager logits and gradients."""
    import torch._dynamo

    from fusionkd.engine.trainer import compile_networks

    model, _ = _model("wrn_16_1")
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert compile_networks(model) == 1 + 3 + 1  # stem, three stages, head
    for net in (model, eager):
        net.train()
        F.cross_entropy(net(x), y).backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 4  # graphs were compiled, none fell back
    for (n, a), (_, b) in zip(model.named_parameters(), eager.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), n
    model.eval(), eager.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), eager(x), rtol=1e-4, atol=1e-5)
