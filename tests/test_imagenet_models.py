"""The ImageNet-family zoo networks: torchvision's exact state-dict layout, parameter counts, the contract.

``tests/data/torchvision_layouts.json`` holds every ``state_dict`` key and shape of torchvision 0.29.1's
``resnet18``, ``resnet34``, ``resnet50`` and ``mobilenet_v2`` at 1000 classes, taken from torchvision itself
(its model modules imported from the unpacked wheel, with the package's C operators bypassed: torchvision
cannot be installed on the CPU machines). Nothing here imports torchvision.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fusionkd.models import create_model

LAYOUTS = json.loads((Path(__file__).parent / "data" / "torchvision_layouts.json").read_text())
NAMES = ["imagenet_resnet18", "imagenet_resnet34", "imagenet_resnet50", "imagenet_mobilenet_v2"]
#: torchvision's parameter counts at 1000 classes (its documentation's "num_params")
PARAMS_1000 = {"imagenet_resnet18": 11_689_512, "imagenet_resnet34": 21_797_672,
               "imagenet_resnet50": 25_557_032, "imagenet_mobilenet_v2": 3_504_872}
STAGE_CHANNELS = {"imagenet_resnet18": [64, 128, 256, 512], "imagenet_resnet34": [64, 128, 256, 512],
                  "imagenet_resnet50": [256, 512, 1024, 2048], "imagenet_mobilenet_v2": [24, 32, 96, 320]}


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_is_torchvision_key_for_key_and_shape_for_shape(name: str) -> None:
    model = create_model(name, num_classes=1000, in_chans=3)
    mine = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    expected = LAYOUTS[name]
    assert [k for k, _ in mine] == [k for k, _ in expected]  # same keys in the same order
    assert mine == expected
    assert sum(p.numel() for p in model.parameters()) == PARAMS_1000[name]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("in_chans,size", [(1, 32), (3, 32), (3, 64), (1, 45)])
def test_contract_at_small_and_odd_sizes(name: str, in_chans: int, size: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_chans=in_chans).eval()
    x = torch.randn(2, in_chans, size, size)
    with torch.no_grad():
        logits = model(x)
        maps = model.forward_stages(x)
        assert torch.equal(model.forward_head(maps[-1]), logits)
        assert torch.equal(model.head(maps[-1]), logits)  # the head view computes the same
    assert logits.shape == (2, 7)
    assert [s.channels for s in model.stage_info] == STAGE_CHANNELS[name]
    assert [s.stride for s in model.stage_info] == [4, 8, 16, 32]
    for info, fmap in zip(model.stage_info, maps, strict=True):
        side = math.ceil(size / info.stride)
        assert fmap.shape == (2, info.channels, side, side)
    # in_chans changes only the first convolution
    first = next(iter(model.state_dict().values()))
    assert first.shape[1] == in_chans


def test_224_input_gives_the_imagenet_map_sizes() -> None:
    model = create_model("imagenet_resnet18", num_classes=1000).eval()
    with torch.no_grad():
        maps = model.forward_stages(torch.randn(1, 3, 224, 224))
    assert [m.shape[-1] for m in maps] == [56, 28, 14, 7]


def test_views_follow_a_replaced_classifier_and_survive_deepcopy() -> None:
    torch.manual_seed(0)
    model = create_model("imagenet_resnet18", num_classes=1000).eval()
    model.fc = nn.Linear(512, 3)  # the torchvision idiom for fine-tuning
    assert model.head.fc is model.fc
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 3)
        assert model.forward_head(model.forward_stages(x)[-1]).shape == (2, 3)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.fc.weight.add_(1.0)
    assert twin.head.fc is twin.fc and not torch.equal(twin.fc.weight, model.fc.weight)
    assert list(twin.state_dict()) == list(model.state_dict())
    # the contract's parts are views: their parameters are the model's own, never extra copies
    ids = {id(p) for p in model.parameters()}
    assert {id(p) for p in model.stem.parameters()} <= ids
    assert {id(p) for p in model.stages.parameters()} <= ids


def test_mobilenet_head_view_is_the_final_conv_and_classifier() -> None:
    model = create_model("imagenet_mobilenet_v2", num_classes=10)
    assert model.head.pre is model.features[18]
    assert model.head.fc is model.classifier[1]
    assert model.num_features == 1280
