"""``HookBackbone(..., tail=fn, stage_format="NHWC")``: a network whose forward runs more than pooling between
its last stage and its classifier (a head norm, a functional in-place ReLU) and whose stages output
channels-last tensors, on the contract without torchvision (the torchvision families themselves are tested
against the real package in tests/interop/test_torchvision_families.py)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusionkd
from fusionkd.models import HookBackbone
from fusionkd.models.base import stage_maps


class NHWC(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


class ChannelsLastNet(nn.Module):
    """Two stages whose outputs are ``(B, H, W, C)``, then (in its forward) an in-place ReLU, a LayerNorm on the
    channels-last map, pooling and a linear classifier: a Swin/DenseNet-like head in miniature."""

    def __init__(self, in_chans: int = 1, num_classes: int = 3) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(in_chans, 4, 3, 2, 1), NHWC())
        self.stage2 = nn.Sequential(nn.Conv2d(4, 6, 3, 2, 1), NHWC())
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        x = self.stage2(self.stage1(x).permute(0, 3, 1, 2))
        return self.fc(self.norm(F.relu(x, inplace=True)).mean(dim=(1, 2)))


def channels_last_net() -> nn.Module:
    return ChannelsLastNet()


def the_tail(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ChannelsLastNet runs between its last stage (offered NCHW) and ``fc``."""
    return model.norm(F.relu(x.permute(0, 2, 3, 1))).mean(dim=(1, 2))


def wrapped(**kw) -> HookBackbone:
    torch.manual_seed(0)
    return HookBackbone(channels_last_net(), ["stage1", "stage2"], "fc", input_shape=(1, 8, 8), **kw)


def test_the_tail_and_channels_last_stages_keep_the_contract():
    net = wrapped(tail=the_tail, stage_format="NHWC")
    assert net.keeps_contract
    assert [(s.channels, s.stride) for s in net.stage_info] == [(4, 2), (6, 4)]
    x = torch.randn(2, 1, 8, 8)
    maps = net.forward_stages(x)
    assert [tuple(m.shape) for m in maps] == [(2, 4, 4, 4), (2, 6, 2, 2)]  # NCHW
    assert (maps[-1] < 0).any()  # read before the forward's in-place ReLU
    torch.testing.assert_close(net.forward_head(maps[-1]), net(x))
    torch.testing.assert_close(net.head.fc(net.head.pooled(maps[-1])), net(x))
    both, raw = stage_maps(net, x)
    assert all(torch.equal(a, b) for a, b in zip(both, raw, strict=True))
    loss = net.forward_head(maps[-1]).sum()
    loss.backward()  # the gradient reaches the stages and the tail's norm
    assert net.module.stage1[0].weight.grad is not None and net.module.norm.weight.grad is not None


def test_without_the_tail_the_contract_is_seen_broken():
    with pytest.warns(UserWarning, match="differs from the forward"):
        net = wrapped(stage_format="NHWC")
    assert net.keeps_contract is False
    with pytest.raises(ValueError, match="stage_format must be 'NCHW' or 'NHWC'"):
        wrapped(stage_format="nhwc")


def test_copies_are_independent_and_rebuilt_keeps_the_settings():
    net = wrapped(tail=the_tail, stage_format="NHWC")
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin.module.norm.weight.mul_(3.0)
    x = torch.randn(2, 1, 8, 8)
    # the tail is called with the copy's own module: changing the copy's norm changes only the copy's head
    head = twin.forward_head(twin.forward_stages(x)[-1])
    assert not torch.allclose(head, net.forward_head(net.forward_stages(x)[-1]))
    torch.testing.assert_close(twin.forward_head(twin.forward_stages(x)[-1]), twin(x))
    again = net.rebuilt()
    assert again.tail is the_tail and again.stage_format == "NHWC" and again.keeps_contract
    assert pickle.loads(pickle.dumps(net.tail)) is the_tail  # a module-level function: picklable by name


def test_byot_refuses_a_tail_naming_it_and_the_other_self_methods_train(tmp_path):
    data = {"num_classes": 3, "in_chans": 1, "train_size": 24, "test_size": 6}
    tiny = dict(dataset="synthetic", dataset_options=data, image_size=8, val_fraction=0.25, batch_size=8,
                eval_batch_size=64, epochs=1, lr=0.01, progress="none", threads=1, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="head is its own tail \\(the_tail.*\\(byot\\) cannot use this network"):
        fusionkd.train(method="byot", model=wrapped(tail=the_tail, stage_format="NHWC"), **tiny)
    r = fusionkd.train(method="frskd", model=wrapped(tail=the_tail, stage_format="NHWC"), name="frskd", **tiny)
    assert r.summary["finished"]
