"""Tests of the model zoo and the backbone contract (CPU, tiny batches)."""

from __future__ import annotations

import copy
import functools
import math
import re
import warnings

import pytest
import torch
from torch import nn

from fusionkd.models import (
    MODELS,
    Backbone,
    ClassifierHead,
    HookBackbone,
    SplitNetwork,
    StageInfo,
    Tail,
    Trunk,
    create_model,
    list_models,
    register_model,
)
from fusionkd.registry import UnknownNameError

ALL_MODELS = list_models()
# (C, H) of the two input kinds every model must handle: Fashion-MNIST and CIFAR
INPUTS = [(1, 28), (3, 32)]


@functools.cache
def _model(name: str, in_chans: int, num_classes: int = 10) -> Backbone:
    """One eval-mode instance per (name, in_chans, num_classes); tests must not mutate it."""
    torch.manual_seed(0)
    return create_model(name, num_classes=num_classes, in_chans=in_chans).eval()


def _input(in_chans: int, size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, in_chans, size, size, generator=torch.Generator().manual_seed(1))


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- registry
def test_registry_lists_the_zoo() -> None:
    expected = {
        "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4", "resnet32x4", "resnet18",
        "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13", "vgg16", "mobilenetv2",
    }  # fmt: skip
    assert expected <= set(ALL_MODELS)
    for entry in MODELS.entries():
        assert entry.description and "\n" not in entry.description


def test_unknown_model_name_lists_names() -> None:
    with pytest.raises(UnknownNameError) as err:
        create_model("resnet21")
    message = str(err.value)
    assert "'resnet20'" in message  # close match
    for name in ALL_MODELS:
        assert name in message
    assert isinstance(err.value, KeyError)


def test_register_model_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="twice"):
        register_model("resnet20", "duplicate")(lambda num_classes, in_chans: None)


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet20", num_classes=0)
    with pytest.raises(ValueError, match="in_chans"):
        create_model("wrn_16_1", in_chans=0)
    with pytest.raises(TypeError):
        create_model("resnet20", widen=3)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_description_param_count_is_accurate(name: str) -> None:
    """The "X M params at 100 classes" of each description is the real count, rounded."""
    match = re.search(r"([\d.]+) M params at 100 classes", MODELS.entry(name).description)
    assert match, MODELS.entry(name).description
    n = _num_params(_model(name, 3, 100))
    assert float(match.group(1)) == pytest.approx(n / 1e6, abs=0.0051)


# ----------------------------------------------------------------------------- shapes and contract
@pytest.mark.parametrize("in_chans,size", INPUTS)
@pytest.mark.parametrize("name", ALL_MODELS)
def test_shapes_stage_info_and_head(name: str, in_chans: int, size: int) -> None:
    model = _model(name, in_chans)
    assert isinstance(model, Backbone)
    assert (model.num_classes, model.in_chans) == (10, in_chans)
    x = _input(in_chans, size)
    with torch.no_grad():
        logits = model(x)
        maps = model.forward_stages(x)
        head_logits = model.forward_head(maps[-1])
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    # stage_info is the truth about forward_stages
    assert len(maps) == len(model.stage_info) == model.num_stages >= 3
    for i, (info, fmap) in enumerate(zip(model.stage_info, maps)):
        assert isinstance(info, StageInfo)
        assert info.name == f"stages.{i}"
        assert fmap.shape == (2, info.channels, math.ceil(size / info.stride), math.ceil(size / info.stride))
    strides = [info.stride for info in model.stage_info]
    assert strides == sorted(strides) and min(m.shape[-1] for m in maps) >= 1
    # forward == forward_head(forward_stages(x)[-1]), bit for bit
    assert torch.equal(head_logits, logits)
    assert model.head.pooled(maps[-1]).shape == (2, model.num_features)


@pytest.mark.parametrize("name", ["resnet20", "wrn_16_1", "vgg8", "mobilenetv2"])
def test_train_mode_backward(name: str) -> None:
    """Every parameter gets a gradient through forward_stages + forward_head in train mode."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_chans=1).train()
    maps = model.forward_stages(_input(1, 28))
    loss = model.forward_head(maps[-1]).logsumexp(1).mean() + sum(m.mean() for m in maps)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_stage_maps_are_not_modified_in_place() -> None:
    """A returned stage map keeps its value after the later stages ran (no in-place op on it)."""
    model = _model("resnet18", 3)
    x = _input(3, 32)
    with torch.no_grad():
        maps = model.forward_stages(x)
        trunk, _ = model.split(1)
        assert torch.equal(maps[0], trunk(x))


# ----------------------------------------------------------------------------- parameter counts
# millions of parameters at 100 classes (RepDistiller / CRD tables; resnet20 with projection shortcuts)
PUBLISHED_PARAMS = {
    "resnet20": 0.28,
    "resnet56": 0.86,
    "resnet110": 1.73,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_2": 0.70,
    "wrn_40_2": 2.25,
    "resnet18": 11.22,
    "vgg8": 3.96,
    "vgg13": 9.46,
    "mobilenetv2": 0.81,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_match_published(name: str) -> None:
    n = _num_params(_model(name, 3, 100))
    assert n / 1e6 == pytest.approx(PUBLISHED_PARAMS[name], rel=0.02)


def test_in_chans_and_num_classes_change_only_first_and_last_layers() -> None:
    base = _num_params(_model("resnet20", 3, 100))
    assert _num_params(_model("resnet20", 1, 100)) == base - 2 * 16 * 9
    assert _num_params(_model("resnet20", 3, 10)) == base - 90 * 65


# ----------------------------------------------------------------------------- split
@pytest.mark.parametrize("name", ALL_MODELS)
def test_split_reproduces_forward(name: str) -> None:
    model = _model(name, 3)
    x = _input(3, 32)
    with torch.no_grad():
        logits, maps, raw = model(x), model.forward_stages(x), model.forward_stages(x, raw=True)
        for k in range(1, model.num_stages):
            trunk, tail = model.split(k)
            assert isinstance(trunk, Trunk) and isinstance(tail, Tail)
            assert trunk.stage_info + tail.stage_info == model.stage_info
            trunk_maps = trunk.forward_stages(x)
            tail_maps = tail.forward_stages(trunk_maps[-1])
            # the trunk's last map is the raw output its branches read (each applies its own BN-ReLU on a
            # pre-activation net); every other map is the whole network's
            for a, b in zip(trunk_maps[:-1] + tail_maps, maps[:k - 1] + maps[k:]):
                assert torch.equal(a, b)
            assert torch.equal(trunk_maps[-1], raw[k - 1])
            assert torch.equal(tail(trunk(x)), logits)
            assert torch.equal(tail.forward_head(tail_maps[-1]), logits)
            assert tail.num_classes == model.num_classes and tail.num_features == model.num_features


def test_split_shares_parameters_and_copies_are_independent() -> None:
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).eval()
    trunk, tail = model.split(2)
    assert tail.head.fc.weight is model.head.fc.weight  # a view of the backbone, not a copy
    assert trunk.stem is model.stem
    branch = copy.deepcopy(tail)
    x = _input(3, 32)
    with torch.no_grad():
        feats = trunk(x)
        before = tail(feats).clone()
        assert torch.equal(branch(feats), before)
        for p in branch.parameters():
            p.add_(0.1)
        assert torch.equal(tail(feats), before)  # the original tail is untouched
        assert not torch.equal(branch(feats), before)
    assert not set(map(id, branch.parameters())) & set(map(id, model.parameters()))


@pytest.mark.parametrize("k", [0, 3, -1, 10])
def test_bad_split_stage(k: int) -> None:
    model = _model("resnet20", 3)
    with pytest.raises(ValueError, match="split stage must be between 1 and 2"):
        model.split(k)


@pytest.mark.parametrize("name", ["resnet20", "wrn_16_1", "vgg8", "mobilenetv2"])
def test_split_network_equals_original(name: str) -> None:
    model = _model(name, 1)
    trunk, tail = model.split(model.num_stages - 1)
    net = SplitNetwork(trunk, tail).eval()
    x = _input(1, 28)
    with torch.no_grad():
        assert torch.equal(net(x), model(x))
        maps, ref = net.forward_stages(x), model.forward_stages(x)
        assert len(maps) == len(ref) and all(torch.equal(a, b) for a, b in zip(maps, ref))
        assert torch.equal(net.forward_head(maps[-1]), model(x))
    assert net.stage_info == model.stage_info
    assert (net.num_classes, net.num_features) == (model.num_classes, model.num_features)
    assert _num_params(net) == _num_params(model)


# ----------------------------------------------------------------------------- HookBackbone
class TinyNet(nn.Module):
    """A user network: conv stem, three named blocks, GAP, fc."""

    def __init__(self, in_chans: int = 1, num_classes: int = 7) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.features = nn.Sequential()
        self.features.add_module("block1", nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()))
        self.features.add_module("block2", nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU()))
        self.features.add_module(
            "block3", nn.Sequential(nn.Conv2d(16, 24, 3, 2, 1), nn.BatchNorm2d(24), nn.ReLU())
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


STAGES = ["features.block1", "features.block2", "features.block3"]


def _hooked(**kw) -> HookBackbone:
    torch.manual_seed(0)
    return HookBackbone(TinyNet(), STAGES, "fc", input_shape=(1, 28, 28), **kw)


def test_hook_backbone_contract() -> None:
    net = _hooked()
    assert net.stage_info == [
        StageInfo(STAGES[0], 8, 1),
        StageInfo(STAGES[1], 16, 2),
        StageInfo(STAGES[2], 24, 4),
    ]
    assert (net.num_classes, net.num_features, net.num_stages, net.in_chans) == (7, 24, 3, 1)
    assert net.module.training  # the dry run restored the train/eval flags
    net.eval()
    x = _input(1, 28)
    with torch.no_grad():
        maps = net.forward_stages(x)
        assert [tuple(m.shape) for m in maps] == [(2, 8, 28, 28), (2, 16, 14, 14), (2, 24, 7, 7)]
        assert torch.equal(net.forward_head(maps[-1]), net(x))
        assert torch.equal(net(x), net.module(x))
        assert net.head.pooled(maps[-1]).shape == (2, net.num_features)
        # at 32x32 the maps follow stage_info too
        for info, fmap in zip(net.stage_info, net.forward_stages(_input(1, 32))):
            assert fmap.shape[1:] == (info.channels, 32 // info.stride, 32 // info.stride)
    assert sum(p.numel() for p in net.parameters()) == _num_params(net.module)


def test_hook_backbone_leaves_no_hooks_and_trains() -> None:
    net = _hooked().train()
    maps = net.forward_stages(_input(1, 28))
    net.forward_head(maps[-1]).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert all(not m._forward_hooks for m in net.module.modules())
    branch = copy.deepcopy(net)  # deep copies keep working, with their own weights
    assert len(branch.forward_stages(_input(1, 28))) == 3


def test_hook_backbone_bad_names() -> None:
    with pytest.raises(
        UnknownNameError, match=r"no submodule 'features.blok2'.*Did you mean 'features.block2'"
    ):
        HookBackbone(TinyNet(), ["features.block1", "features.blok2"], "fc", input_shape=(1, 28, 28))
    with pytest.raises(UnknownNameError, match="Available names.*features.block3"):
        HookBackbone(TinyNet(), STAGES, "classifier", input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match="distinct"):
        HookBackbone(TinyNet(), [STAGES[0], STAGES[0]], "fc", input_shape=(1, 28, 28))
    with pytest.raises(TypeError, match="list of module names"):
        HookBackbone(TinyNet(), "features.block1", "fc", input_shape=(1, 28, 28))


def test_hook_backbone_non_map_stage() -> None:
    with pytest.raises(
        TypeError, match=r"'fc' must return a 4-D \(B, C, H, W\) tensor, got a tensor of shape \(1, 7\)"
    ):
        HookBackbone(TinyNet(), ["features.block1", "fc"], "pool", input_shape=(1, 28, 28))


def test_hook_backbone_head_that_does_not_fit_the_last_stage() -> None:
    with pytest.raises(ValueError, match="cannot be applied to the last stage map 'features.block2'"):
        HookBackbone(TinyNet(), STAGES[:2], "fc", input_shape=(1, 28, 28))


def test_hook_backbone_cannot_split() -> None:
    with pytest.raises(TypeError, match="cannot be split.*zoo backbone"):
        _hooked().split(1)


class ShiftedNet(TinyNet):
    """Does something between the last stage and the head, so forward_head cannot reproduce forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(x)) + 1.0
        return self.fc(torch.flatten(self.pool(x), 1))


def test_hook_backbone_warns_when_head_does_not_follow_last_stage() -> None:
    with pytest.warns(UserWarning, match="differs from the forward"):
        HookBackbone(ShiftedNet(), STAGES, "fc", input_shape=(1, 28, 28))


def test_hook_backbone_on_sequential_without_pooling() -> None:
    """pool=False: the head gets the map itself (here a Sequential doing its own pooling)."""
    torch.manual_seed(0)
    seq = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net = HookBackbone(seq, ["1", "3"], "4", input_shape=(3, 32, 32), pool=False).eval()
    assert [(s.channels, s.stride) for s in net.stage_info] == [(4, 1), (6, 2)]
    assert (net.num_classes, net.num_features) == (3, 6)
    x = _input(3, 32)
    with torch.no_grad():
        assert torch.equal(net.forward_head(net.forward_stages(x)[-1]), seq(x))


def test_classifier_head_with_pre() -> None:
    head = ClassifierHead(4, 3, pre=nn.Conv2d(4, 9, 1), features=9, dropout=0.5).eval()
    assert head.num_features == 9
    assert head(torch.randn(2, 4, 3, 3)).shape == (2, 3)
