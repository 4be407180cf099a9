"""CIFAR VGGs with BatchNorm as in RepDistiller's ``vgg.py``: ``vgg8``, ``vgg11``, ``vgg13``, ``vgg16``, ``vgg19``.

RepDistiller's network is five conv blocks ``block0 .. block4`` (3x3 conv with bias -> BN -> ReLU,
repeated), a 2x2 max-pool after blocks 0, 1 and 2 (the pool after block 3 is only used for 64x64
inputs, so on CIFAR blocks 3 and 4 both run at 4x4), global average pooling and one
``Linear(512, num_classes)``.

Stage mapping (a stage ends at a resolution change): blocks 3 and 4 share a resolution, so they form
one stage and the backbone has **four** stages with strides 1/2/4/8:

=====  ===========================  ==========  ==================
stage  layers                       channels    map at 32x32
=====  ===========================  ==========  ==================
0      block0                       64          64x32x32
1      pool, block1                 128         128x16x16
2      pool, block2                 256         256x8x8
3      pool, block3, block4         512         512x4x4
=====  ===========================  ==========  ==================

Stage outputs are RepDistiller's features ``f0, f1, f2, f4`` (post-ReLU block outputs); ``f3`` is
inside stage 3. The stem is the identity. Max-pools use ``ceil_mode=True`` so that odd sizes keep
every pixel (28x28 gives 28/14/7/4), which is identical to floor mode on even sizes (32x32).

The stages regroup RepDistiller's blocks, so its files (keys ``block0.0.weight`` ... ``classifier.weight``)
are read through the key map of :mod:`fusionkd.models.community`, which uses ``config`` and ``batch_norm``.
"""

from __future__ import annotations

from torch import nn

from .base import Backbone, ClassifierHead
from .layers import init_weights
from .registry import register_model

VGG_CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _conv_block(widths: list[int], in_channels: int, batch_norm: bool) -> list[nn.Module]:
    """``len(widths)`` times 3x3 conv (with bias, as in the reference) -> [BN] -> ReLU."""
    layers: list[nn.Module] = []
    for width in widths:
        layers.append(nn.Conv2d(in_channels, width, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU(inplace=True))
        in_channels = width
    return layers


class VGG(Backbone):
    """CIFAR VGG from a five-block configuration (see the module docstring for the stage mapping).

    Args:
        config: output widths of the convolutions of each of the five blocks.
        num_classes: number of logits.
        in_chans: input image channels.
        batch_norm: BatchNorm after every convolution (the zoo models use it).

    Shapes: ``(B, in_chans, H, W)`` -> stage ``i``: ``(B, C_i, ceil(H / 2**i), ceil(W / 2**i))`` with
    ``C = (c0, c1, c2, c4)`` the last widths of blocks 0, 1, 2, 4 -> logits ``(B, num_classes)``.
    """

    def __init__(
        self, config: list[list[int]], num_classes: int = 10, in_chans: int = 3, batch_norm: bool = True
    ) -> None:
        super().__init__(num_classes, in_chans)
        if len(config) != 5 or any(not block for block in config):
            raise ValueError(f"a VGG configuration has five non-empty blocks, got {config}")
        self.config = [list(widths) for widths in config]
        self.batch_norm = batch_norm
        blocks, in_channels = [], in_chans
        for widths in config:
            blocks.append(_conv_block(widths, in_channels, batch_norm))
            in_channels = widths[-1]

        def pool() -> nn.MaxPool2d:
            return nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)

        self.stem = nn.Identity()
        self.stages = nn.ModuleList(
            [
                nn.Sequential(*blocks[0]),
                nn.Sequential(pool(), *blocks[1]),
                nn.Sequential(pool(), *blocks[2]),
                nn.Sequential(pool(), *blocks[3], *blocks[4]),
            ]
        )
        self.head = ClassifierHead(in_channels, num_classes)
        init_weights(self, linear_std=0.01)
        self._finish([config[0][-1], config[1][-1], config[2][-1], config[4][-1]], [1, 2, 4, 8])


@register_model("vgg8", "CIFAR VGG-8 with BN (4 stages 64/128/256/512, 3.97 M params at 100 classes)")
def vgg8(num_classes: int = 10, in_chans: int = 3, batch_norm: bool = True) -> VGG:
    return VGG(VGG_CONFIGS["vgg8"], num_classes, in_chans, batch_norm)


@register_model("vgg11", "CIFAR VGG-11 with BN (4 stages 64/128/256/512, 9.28 M params at 100 classes)")
def vgg11(num_classes: int = 10, in_chans: int = 3, batch_norm: bool = True) -> VGG:
    return VGG(VGG_CONFIGS["vgg11"], num_classes, in_chans, batch_norm)


@register_model("vgg13", "CIFAR VGG-13 with BN (4 stages 64/128/256/512, 9.46 M params at 100 classes)")
def vgg13(num_classes: int = 10, in_chans: int = 3, batch_norm: bool = True) -> VGG:
    return VGG(VGG_CONFIGS["vgg13"], num_classes, in_chans, batch_norm)


@register_model("vgg16", "CIFAR VGG-16 with BN (4 stages 64/128/256/512, 14.77 M params at 100 classes)")
def vgg16(num_classes: int = 10, in_chans: int = 3, batch_norm: bool = True) -> VGG:
    return VGG(VGG_CONFIGS["vgg16"], num_classes, in_chans, batch_norm)


@register_model("vgg19", "CIFAR VGG-19 with BN (4 stages 64/128/256/512, 20.09 M params at 100 classes)")
def vgg19(num_classes: int = 10, in_chans: int = 3, batch_norm: bool = True) -> VGG:
    return VGG(VGG_CONFIGS["vgg19"], num_classes, in_chans, batch_norm)
