"""ImageNet-family networks with torchvision's exact parameter layout, on fusionkd's backbone contract.

``imagenet_resnet18/34/50`` (He et al. 2016) and ``imagenet_mobilenet_v2`` (Sandler et al. 2018) are written
in plain torch, module for module as in torchvision's ``resnet.py`` and ``mobilenetv2.py``, so that their
``state_dict`` keys and shapes are exactly torchvision's (``conv1.weight``, ``layer4.1.conv2.weight``,
``fc.weight``, ``features.18.0.weight``, ``classifier.1.weight`` ...): a torchvision weights file loads
with no key mapping (``weights=FILE``, see docs/models.md), and so does a timm **ResNet** file (timm's
ResNets use torchvision's names). timm's MobileNetV2 (``mobilenetv2_100``, built by its ``EfficientNet``
class) does not: its keys are ``conv_stem``, ``bn1``, ``blocks.*``, ``conv_head``, ``bn2``, ``classifier``,
which are not mapped, so such a file is refused with the missing and unexpected keys; use a torchvision
MobileNetV2 file. Parameters at 1000 classes: 11,689,512 /
21,797,672 / 25,557,032 / 3,504,872, as torchvision's.

The contract's ``stem`` / ``stages`` / ``head`` are *views* of the same modules, kept out of the module
tree (so they add no second set of state-dict keys):

=====================  =======================================  ======================  ==============
network                stem                                     stages (stride)         head
=====================  =======================================  ======================  ==============
imagenet_resnet18/34   conv1 bn1 relu maxpool                   layer1..4 (4/8/16/32)   avgpool + fc
imagenet_resnet50      conv1 bn1 relu maxpool                   layer1..4 (4/8/16/32)   avgpool + fc
imagenet_mobilenet_v2  features.0                               features.1-3, 4-6,      features.18,
                                                                7-13, 14-17             avgpool, classifier
=====================  =======================================  ======================  ==============

Stage widths: 64/128/256/512 (ResNet-18/34), 256/512/1024/2048 (ResNet-50), 24/32/96/320 (MobileNetV2).
Any input of at least 32x32 works (a 32x32 input gives a 1x1 last map); 224x224 is the ImageNet size.
``in_chans`` changes only the first convolution; a 3-channel weights file loads into a 1-channel network
by summing the first convolution over its input channels (as timm does), see
:func:`fusionkd.models.weights.load_weights_file`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .base import Backbone, ClassifierHead
from .registry import register_model


class ViewHead(ClassifierHead):
    """A :class:`ClassifierHead` made of existing modules (``pre``, ``dropout``, ``fc``), building none."""

    def __init__(self, pre: nn.Module, dropout: nn.Module, fc: nn.Linear, num_features: int) -> None:
        nn.Module.__init__(self)
        self.pre, self.dropout, self.fc = pre, dropout, fc
        self.num_features = num_features
        self.pre_activates = False  # ``pre`` is identity (ResNets) or holds weights (MobileNetV2's 1x1 conv)


class _ViewBackbone(Backbone):
    """A :class:`Backbone` whose ``stem`` / ``stages`` / ``head`` are views of torchvision-named modules.

    The views are properties built from the current children on each access, so replacing a child (e.g.
    ``model.fc = nn.Linear(512, 10)``, or SyncBatchNorm conversion) is seen by the whole contract.
    Subclasses implement :meth:`_parts`.
    """

    #: dotted prefix of the final linear layer in ``state_dict`` (used to replace a classifier of another size)
    classifier_key = "fc"

    def _parts(self) -> tuple[nn.Module, list[nn.Module], ViewHead]:
        """``(stem, stages, head)`` as views of the current children; every subclass defines it (an
        abstract hook of this base class, which is never instantiated itself)."""
        raise NotImplementedError(f"{type(self).__name__} must define _parts()")

    @property
    def stem(self) -> nn.Module:  # type: ignore[override]
        return self._parts()[0]

    @property
    def stages(self) -> nn.ModuleList:  # type: ignore[override]
        return nn.ModuleList(self._parts()[1])

    @property
    def head(self) -> ViewHead:  # type: ignore[override]
        return self._parts()[2]

    def forward_stages(self, x: torch.Tensor, raw: bool = False) -> list[torch.Tensor]:
        """The stage outputs. torchvision's ResNet stages end in a ReLU and MobileNetV2's in the linear
        bottleneck the next 1x1 conv reads, so the raw output already is the contract's map (``raw`` is
        accepted for the contract and changes nothing)."""
        stem, stages, _ = self._parts()
        x = stem(x)
        out = []
        for stage in stages:
            x = stage(x)
            out.append(x)
        return out

    def forward_stages_both(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        maps = self.forward_stages(x)
        return maps, maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_stages(x)[-1])


# ---------------------------------------------------------------------- ResNet
def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x))``.

    ``(B, inplanes, H, W) -> (B, planes, ceil(H / stride), ceil(W / stride))``.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (ResNet v1.5: the stride is on the 3x3 conv):
    ``1x1 -> 3x3 (stride) -> 1x1 (x4 channels)`` + ``downsample(x)``.

    ``(B, inplanes, H, W) -> (B, 4 * planes, ceil(H / stride), ceil(W / stride))``.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ImageNetResNet(_ViewBackbone):
    """torchvision's ``ResNet``: 7x7 stride-2 conv, BN, ReLU, 3x3 stride-2 max-pool, four stages, GAP, fc.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage (``[2, 2, 2, 2]`` for ResNet-18, ``[3, 4, 6, 3]`` for 34 and 50).
        num_classes: logits.
        in_chans: input image channels.

    Shapes: ``(B, in_chans, H, W)`` -> stage ``i``: ``(B, 64 * 2**i * expansion, ceil(H / 2**(i+2)), ...)``
    -> logits ``(B, num_classes)``.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int], num_classes: int = 1000,
                 in_chans: int = 3) -> None:
        super().__init__(num_classes, in_chans)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        widths = [64 * block.expansion * 2**i for i in range(4)]
        self._finish(widths, [4, 8, 16, 32])

    def _parts(self) -> tuple[nn.Module, list[nn.Module], ViewHead]:
        stem = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)
        return stem, [self.layer1, self.layer2, self.layer3, self.layer4], \
            ViewHead(nn.Identity(), nn.Identity(), self.fc, self.fc.in_features)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)


# ---------------------------------------------------------------------- MobileNetV2
def _make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible``: round to a multiple of ``divisor``, never below 90 % of ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNReLU6(nn.Sequential):
    """torchvision's ``Conv2dNormActivation`` with ReLU6: keys ``0`` (conv), ``1`` (BN)."""

    def __init__(self, inp: int, oup: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(inp, oup, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(oup),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """torchvision's ``InvertedResidual``: [1x1 expand] -> 3x3 depthwise (stride) -> 1x1 project -> BN (+ x).

    ``(B, inp, H, W) -> (B, oup, ceil(H / stride), ceil(W / stride))``; no expansion conv when ``t == 1``.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel_size=1))
        layers += [ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


#: t, c, n, s of Sandler et al. 2018, Table 2
_MBV2_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                 (6, 320, 1, 1)]
#: ``features`` indices of each stage (they end at the last block before each down-sampling)
_MBV2_STAGES = [(1, 4), (4, 7), (7, 14), (14, 18)]


class ImageNetMobileNetV2(_ViewBackbone):
    """torchvision's ``MobileNetV2`` (width 1.0): ``features`` (19 modules), GAP, ``classifier``
    (dropout 0.2, linear 1280 -> classes).

    Shapes: ``(B, in_chans, H, W)`` -> stages at strides 4/8/16/32 with 24/32/96/320 channels ->
    ``features.18``: ``(B, 1280, h, w)`` -> logits ``(B, num_classes)``.
    """

    classifier_key = "classifier.1"

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0,
                 dropout: float = 0.2) -> None:
        super().__init__(num_classes, in_chans)
        input_channel = _make_divisible(32 * width_mult)
        last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(in_chans, input_channel, stride=2)]
        for t, c, n, s in _MBV2_SETTING:
            output_channel = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(ConvBNReLU6(input_channel, last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last_channel, num_classes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        self._finish([self.features[b - 1].out_channels for _, b in _MBV2_STAGES], [4, 8, 16, 32])

    def _parts(self) -> tuple[nn.Module, list[nn.Module], ViewHead]:
        f = self.features
        stages = [nn.Sequential(*f[a:b]) for a, b in _MBV2_STAGES]
        return f[0], stages, ViewHead(f[18], self.classifier[0], self.classifier[1], self.classifier[1].in_features)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(self.features[18](x), 1), 1)
        return self.classifier(x)


def _factory(build: Callable[[int, int], Backbone]) -> Callable[..., Backbone]:
    def make(num_classes: int = 1000, in_chans: int = 3) -> Backbone:
        return build(num_classes, in_chans)

    return make


register_model("imagenet_resnet18", "torchvision ResNet-18 layout (4 stages 64-512, stride 32, 11.23 M params at "
               "100 classes, 11.69 M at 1000)")(_factory(lambda k, c: ImageNetResNet(BasicBlock, [2, 2, 2, 2], k, c)))
register_model("imagenet_resnet34", "torchvision ResNet-34 layout (4 stages 64-512, stride 32, 21.34 M params at "
               "100 classes, 21.80 M at 1000)")(_factory(lambda k, c: ImageNetResNet(BasicBlock, [3, 4, 6, 3], k, c)))
register_model("imagenet_resnet50", "torchvision ResNet-50 layout (4 stages 256-2048, stride 32, 23.71 M params "
               "at 100 classes, 25.56 M at 1000)")(
    _factory(lambda k, c: ImageNetResNet(Bottleneck, [3, 4, 6, 3], k, c)))
register_model("imagenet_mobilenet_v2", "torchvision MobileNetV2 x1.0 layout (4 stages 24-320, stride 32, 2.35 M "
               "params at 100 classes, 3.50 M at 1000)")(_factory(lambda k, c: ImageNetMobileNetV2(k, c)))
