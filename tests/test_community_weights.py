"""The community's CIFAR teacher files load: RepDistiller's ``train_teacher.py`` output (mdistiller's
``cifar_teachers.tar``), read by name through :mod:`fusionkd.models.community`.

The files are made here, from minimal re-implementations of RepDistiller's model code (``models/resnet.py``,
``resnetv2.py``, ``wrn.py``, ``vgg.py``, ``mobilenetv2.py``): the attribute names, which make the state-dict
keys, and the forward passes are RepDistiller's; the ``is_feat`` / ``preact`` feature plumbing is left out.
mdistiller's ``mdistiller/models/cifar`` is the same code with the same names (read for this test; only
formatting and a ``stage_channels`` attribute differ), so the same files stand for its teachers. They are
saved as ``train_teacher.py`` saves them: ``{'epoch', 'model': state_dict, 'accuracy', 'optimizer'}``.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusionkd
from fusionkd.cli import main
from fusionkd.engine.checkpoint import load_checkpoint
from fusionkd.engine.config import ConfigError
from fusionkd.methods import MethodContext
from fusionkd.models import WeightsError, create_model, load_weights_file
from fusionkd.models.community import COVERED, repdistiller_layout


# ----------------------------------------------------------------------------- RepDistiller's names
def _conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class RDBasicBlock(nn.Module):
    """resnet.py's BasicBlock (``downsample``)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class RDResNet(nn.Module):
    """resnet.py's ResNet: conv1 bn1 relu layer1..3 avgpool(8) fc."""

    def __init__(self, depth: int, num_filters: list[int], num_classes: int):
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, 2)
        self.layer3 = self._make_layer(num_filters[3], n, 2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3], num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [RDBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [RDBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        return [f1, f2, self.layer3(f2)]

    def forward(self, x):
        return self.fc(self.avgpool(self.features(x)[-1]).flatten(1))


class RDV2Basic(nn.Module):
    """resnetv2.py's BasicBlock (``shortcut``, an empty Sequential when the shape stays)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class RDV2Bottleneck(nn.Module):
    """resnetv2.py's Bottleneck: the stride on conv2 (3x3)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != 4 * planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, 4 * planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(4 * planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class RDResNetV2(nn.Module):
    """resnetv2.py's ResNet: conv1 bn1 layer1..4 avgpool linear."""

    def __init__(self, block, num_blocks: list[int], num_classes: int):
        super().__init__()
        self.in_planes = 64
        self.conv1 = _conv3(3, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.avgpool(out).flatten(1))


class RDWideBlock(nn.Module):
    """wrn.py's BasicBlock: the projection ``convShortcut`` sees the pre-activated input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = _conv3(in_planes, out_planes, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = _conv3(out_planes, out_planes)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = None if self.equalInOut else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
            out = x
        else:
            out = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return (x if self.equalInOut else self.convShortcut(x)) + out


class RDNetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[RDWideBlock(in_planes if i == 0 else out_planes, out_planes,
                                                 stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class RDWideResNet(nn.Module):
    """wrn.py's WideResNet: conv1 block1..3 bn1 relu fc."""

    def __init__(self, depth: int, num_classes: int, widen_factor: int):
        super().__init__()
        c = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = _conv3(3, c[0])
        self.block1 = RDNetworkBlock(n, c[0], c[1], 1)
        self.block2 = RDNetworkBlock(n, c[1], c[2], 2)
        self.block3 = RDNetworkBlock(n, c[2], c[3], 2)
        self.bn1 = nn.BatchNorm2d(c[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(c[3], num_classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(F.avg_pool2d(self.relu(self.bn1(out)), 8).flatten(1))


VGG_CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


class RDVGG(nn.Module):
    """vgg.py's VGG with batch_norm=True: block0..4 (the last ReLU of each dropped), pool0..4, classifier."""

    def __init__(self, cfg: list[list[int]], num_classes: int):
        super().__init__()
        cins = [3] + [widths[-1] for widths in cfg[:4]]
        for b in range(5):
            setattr(self, f"block{b}", self._make_layers(cfg[b], cins[b]))
        for b in range(4):
            setattr(self, f"pool{b}", nn.MaxPool2d(2, 2))
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)

    @staticmethod
    def _make_layers(widths: list[int], cin: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for v in widths:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
        return nn.Sequential(*layers[:-1])

    def forward(self, x):  # 32x32: pool3 is not used
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = F.relu(self.block4(F.relu(self.block3(x))))
        return self.classifier(self.pool4(x).flatten(1))


class RDInvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, t: int):
        super().__init__()
        self.use_res_connect = stride == 1 and inp == oup
        h = inp * t
        self.conv = nn.Sequential(
            nn.Conv2d(inp, h, 1, 1, 0, bias=False), nn.BatchNorm2d(h), nn.ReLU(inplace=True),
            nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU(inplace=True),
            nn.Conv2d(h, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class RDMobileNetV2(nn.Module):
    """mobilenetv2.py's MobileNetV2 (``mobile_half``: T=6, width 0.5): conv1 blocks conv2 classifier."""

    def __init__(self, T: int, feature_dim: int, width_mult: float):
        super().__init__()
        setting = [[1, 16, 1, 1], [T, 24, 2, 1], [T, 32, 3, 2], [T, 64, 4, 2], [T, 96, 3, 1], [T, 160, 3, 2],
                   [T, 320, 1, 1]]
        cin = int(32 * width_mult)
        self.conv1 = nn.Sequential(nn.Conv2d(3, cin, 3, 2, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        self.blocks = nn.ModuleList([])
        for t, c, n, s in setting:
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(RDInvertedResidual(cin, int(c * width_mult), stride, t))
                cin = int(c * width_mult)
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = 1280
        self.conv2 = nn.Sequential(nn.Conv2d(cin, 1280, 1, 1, 0, bias=False), nn.BatchNorm2d(1280),
                                   nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Linear(1280, feature_dim))
        self.avgpool = nn.AvgPool2d(32 // 16, ceil_mode=True)

    def forward(self, x):
        out = self.conv1(x)
        for block in self.blocks:
            out = block(out)
        return self.classifier(self.avgpool(self.conv2(out)).flatten(1))


def repdistiller(name: str, num_classes: int = 100) -> nn.Module:
    """RepDistiller's ``model_dict[...]`` for the zoo name ``name``."""
    match = re.fullmatch(r"resnet(\d+)(x4)?", name)
    if match and name not in ("resnet18", "resnet50"):
        return RDResNet(int(match.group(1)), [32, 64, 128, 256] if match.group(2) else [16, 16, 32, 64], num_classes)
    if name == "resnet18":
        return RDResNetV2(RDV2Basic, [2, 2, 2, 2], num_classes)
    if name == "resnet50":
        return RDResNetV2(RDV2Bottleneck, [3, 4, 6, 3], num_classes)
    if name.startswith("wrn_"):
        _, depth, widen = name.split("_")
        return RDWideResNet(int(depth), num_classes, int(widen))
    if name.startswith("vgg"):
        return RDVGG(VGG_CFG[name], num_classes)
    if name == "mobilenetv2":
        return RDMobileNetV2(6, num_classes, 0.5)
    raise KeyError(name)


# ----------------------------------------------------------------------------- helpers
def randomise(net: nn.Module, seed: int) -> nn.Module:
    """Every parameter and BatchNorm statistic random (so that a swapped or mis-mapped tensor shows in the
    logits), at a scale that keeps deep networks' activations finite; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(97_500)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return net.eval()


def save_teacher(net: nn.Module, path, *, momentum_step: bool = False) -> None:
    """What RepDistiller's train_teacher.py saves every save_freq epochs (ckpt_epoch_240.pth)."""
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    if momentum_step:  # a real file carries the momentum buffers
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    torch.save({"epoch": 240, "model": net.state_dict(), "accuracy": torch.tensor(79.42),
                "optimizer": opt.state_dict()}, path)


def _input(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def assert_same_logits(a: torch.Tensor, b: torch.Tensor) -> float:
    err = float((a - b).abs().max())
    assert err <= 1e-5 * max(1.0, float(a.abs().max())), (err, float(a.abs().max()))
    return err


# ----------------------------------------------------------------------------- the layout itself
def test_covered_networks_are_the_zoo_names_with_a_repdistiller_counterpart():
    assert set(COVERED) == {"resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                            "resnet8x4", "resnet32x4", "resnet18", "resnet50", "wrn_16_1", "wrn_16_2", "wrn_40_1",
                            "wrn_40_2", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "mobilenetv2"}
    assert repdistiller_layout(create_model("imagenet_resnet18")) is None  # torchvision's layout is native


@pytest.mark.parametrize("name", sorted(COVERED))
def test_layout_names_every_tensor_with_repdistillers_key_and_shape(name):
    """For every covered network, the layout's file keys are exactly RepDistiller's state-dict keys, and each
    names a tensor of the same shape (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        ref = repdistiller(name)
        net = create_model(name, num_classes=100)
    layout = repdistiller_layout(net)
    ref_sd, own = ref.state_dict(), net.state_dict()
    assert layout.network == COVERED[name]
    assert set(layout.names) == set(ref_sd)
    assert sorted(layout.names.values()) == sorted(own)
    for theirs, ours in layout.names.items():
        assert ref_sd[theirs].shape == own[ours].shape, (theirs, ours)


# ----------------------------------------------------------------------------- files load, logits equal
@pytest.mark.parametrize("name", sorted(COVERED))
def test_repdistiller_teacher_files_load_with_the_same_logits(tmp_path, name):
    ref = randomise(repdistiller(name), seed=len(name))
    path = tmp_path / "ckpt_epoch_240.pth"
    save_teacher(ref, path)
    net = create_model(name, num_classes=100)
    report = load_weights_file(net, path, replace_classifier=False, what=f"the teacher {name!r}")
    n = len(ref.state_dict())
    assert f"read RepDistiller's layout ({COVERED[name]}): {n} tensors mapped by name" in report.describe()
    assert "state dict taken from the file's 'model' entry" in report.describe()
    assert report.replaced_classifier is None and report.loaded == n
    x = _input()
    with torch.no_grad():
        assert_same_logits(ref(x), net.eval()(x))


def test_stage_maps_are_repdistillers_features_and_keys_are_read_by_name_not_order(tmp_path):
    """resnet32x4 (the usual teacher): stage maps equal RepDistiller's f1..f3; a file whose keys come in another
    order, without num_batches_tracked (saved before torch 0.4.1) and with a 'module.' prefix still loads."""
    ref = randomise(repdistiller("resnet32x4"), seed=3)
    state = {f"module.{k}": v for k, v in reversed(list(ref.state_dict().items()))
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet32x4_best.pth"
    torch.save({"epoch": 211, "model": state, "best_acc": torch.tensor(79.6), "optimizer": {}}, path)
    net = create_model("resnet32x4", num_classes=100).eval()
    report = load_weights_file(net, path, replace_classifier=False)
    assert "read RepDistiller's layout (resnet32x4)" in report.describe()
    x = _input()
    with torch.no_grad():
        for a, b in zip(ref.features(x), net.forward_stages(x), strict=True):
            assert_same_logits(a, b)
        assert_same_logits(ref(x), net(x))


# ----------------------------------------------------------------------------- weights= and teacher_weights=
DATA = {"num_classes": 4, "in_chans": 3, "train_size": 48, "test_size": 16}
TINY = dict(dataset="synthetic", dataset_options=DATA, image_size=16, val_fraction=0.25, batch_size=16,
            eval_batch_size=64, lr=0.05, progress="none", threads=1)


def test_weights_reads_a_repdistiller_pth_tar_into_a_student(tmp_path):
    """weights=FILE.pth.tar (accepted by the config now; it was refused by its suffix): a RepDistiller resnet8
    trained for 100 classes starts a 4-class student, the classifier replaced, everything else loaded."""
    ref = randomise(repdistiller("resnet8"), seed=8)
    path = tmp_path / "resnet8_best.pth.tar"
    save_teacher(ref, path)
    ctx = MethodContext(model="resnet8", num_classes=4, in_chans=3, image_size=16, epochs=1, weights=str(path))
    own = ctx.create().state_dict()
    layout = repdistiller_layout(create_model("resnet8"))
    for theirs, v in ref.state_dict().items():
        ours = layout.names[theirs]
        assert own[ours].shape[0] == 4 if ours.startswith("head.fc.") else torch.equal(own[ours], v), ours
    r = fusionkd.train(method="baseline", model="resnet8", weights=str(path), epochs=1, out_dir=str(tmp_path),
                       name="s", **TINY)
    log_text = (r.run_dir / "train.log").read_text()
    assert f"read RepDistiller's layout (resnet8): {len(ref.state_dict())} tensors mapped by name" in log_text
    assert "classifier 'head.fc' ('fc' in RepDistiller's layout) replaced: the file's has shape (100, 64)" in log_text


def test_kd_from_a_repdistiller_resnet32x4_through_the_cli(tmp_path):
    """The issue's command line: ``fusionkd train --method kd --model resnet8x4 ... teacher_model=resnet32x4
    teacher_weights=resnet32x4_vanilla/ckpt_epoch_240.pth``; the teacher in the run is the file's tensors."""
    ref = randomise(repdistiller("resnet32x4", num_classes=4), seed=32)
    folder = tmp_path / "resnet32x4_vanilla"
    folder.mkdir()
    path = folder / "ckpt_epoch_240.pth"
    save_teacher(ref, path, momentum_step=True)
    rc = main(["train", "--method", "kd", "--model", "resnet8", "--dataset", "synthetic",
               "dataset_options={num_classes: 4, in_chans: 3, train_size: 48, test_size: 16}", "image_size=16",
               "val_fraction=0.25", "epochs=1", "batch_size=16", "threads=1", "progress=none",
               f"out_dir={tmp_path}", "name=kd", "teacher_model=resnet32x4", f"teacher_weights={path}",
               "teacher_min_accuracy=0"])  # random weights: the chance check is not what this test is about
    assert rc == 0
    log_text = (tmp_path / "kd" / "train.log").read_text()
    assert "teacher resnet32x4: " in log_text
    assert f"read RepDistiller's layout (resnet32x4): {len(ref.state_dict())} tensors mapped by name" in log_text
    inside = {k[len("teacher."):]: v for k, v in load_checkpoint(tmp_path / "kd" / "last.pt")["method_state"].items()
              if k.startswith("teacher.")}
    layout = repdistiller_layout(create_model("resnet32x4", num_classes=4))
    assert inside.keys() == set(layout.names.values())
    for theirs, v in ref.state_dict().items():
        assert torch.equal(inside[layout.names[theirs]], v), theirs


# ----------------------------------------------------------------------------- refusals name the keys
def test_foreign_keys_are_refused_naming_them_before_the_classifier(tmp_path):
    """A file in no known layout: teacher_weights= names its keys (it used to say only that the file's
    classifier is None), and so does weights=, with the layouts it reads."""
    foreign = {"features.0.weight": torch.zeros(16, 3, 3, 3), "features.1.weight": torch.ones(16),
               "head.weight": torch.zeros(4, 16)}
    path = tmp_path / "foreign.pth"
    torch.save({"epoch": 3, "model": foreign}, path)
    with pytest.raises(ConfigError) as err:
        fusionkd.train(method="kd", model="resnet8", teacher_model="resnet8", teacher_weights=str(path), epochs=1,
                       out_dir=str(tmp_path), name="t", **TINY)
    message = str(err.value)
    assert message.startswith("teacher_weights: the weights in")
    assert "unexpected features.0.weight, features.1.weight, head.weight" in message
    assert "missing stem.0.weight" in message
    assert "classifier" not in message.split("Files are read")[0]
    assert "RepDistiller's / mdistiller's for this network (resnet8: conv1.weight" in message
    assert "none of the covered networks" in message
    assert not (tmp_path / "t").exists()
    with pytest.raises(WeightsError, match=r"unexpected features\.0\.weight"):
        load_weights_file(create_model("resnet8", num_classes=4), path)


def test_an_injected_classifier_is_not_listed_as_the_files(tmp_path):
    """weights= fills in a classifier of another size; when the file then fails, its keys are the file's own."""
    path = tmp_path / "two.pth"
    torch.save({"foo.weight": torch.zeros(3), "bar.weight": torch.zeros(3)}, path)
    with pytest.raises(WeightsError) as err:
        load_weights_file(create_model("resnet8", num_classes=4), path, replace_classifier=True)
    files = re.search(r"the file's with (.*?)(?:\. |\.$|$)", str(err.value)).group(1)
    assert files == "foo.weight, bar.weight"
    assert "head.fc" not in str(err.value).split("missing")[0]


def test_a_repdistiller_file_of_another_network_is_named(tmp_path):
    """In RepDistiller's layout but not this network: the error is in the file's names and says what it is."""
    path = tmp_path / "resnet110.pth"
    save_teacher(randomise(repdistiller("resnet110"), seed=1), path)
    with pytest.raises(WeightsError) as err:
        load_weights_file(create_model("resnet56", num_classes=100), path)
    message = str(err.value)
    assert "are in RepDistiller's layout" in message and "which is RepDistiller's resnet56" in message
    assert "unexpected layer1.9.conv1.weight" in message
    assert "The file holds RepDistiller's resnet110 for 100 classes: the zoo's 'resnet110'" in message
    with pytest.raises(WeightsError, match=r"shape mismatch conv1\.weight: \(16, 3, 3, 3\) in the file vs "
                                           r"\(32, 3, 3, 3\)"):
        load_weights_file(create_model("resnet32x4", num_classes=100), path)


def test_a_teacher_for_other_classes_names_the_files_classifier(tmp_path):
    path = tmp_path / "wrn.pth"
    save_teacher(randomise(repdistiller("wrn_16_1"), seed=2), path)
    with pytest.raises(WeightsError, match=r"classifier 'head\.fc' \('fc' in RepDistiller's layout\) has shape "
                                           r"\(10, 64\) \(10 classes\) but the file's is \(100, 64\)"):
        load_weights_file(create_model("wrn_16_1", num_classes=10), path, replace_classifier=False)
    # one input channel: the file's 3-channel conv1 is summed, the rest read by name
    grey = create_model("wrn_16_1", num_classes=100, in_chans=1)
    report = load_weights_file(grey, path, replace_classifier=False)
    assert "stem.weight: 3 -> 1 input channel" in report.adapted_first_conv
