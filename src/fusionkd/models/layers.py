"""Small building blocks and the weight initialisation shared by the zoo models."""

from __future__ import annotations

from torch import nn


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """3x3 convolution with padding 1: ``(B, C_in, H, W) -> (B, C_out, ceil(H / s), ceil(W / s))``."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=bias)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """1x1 convolution: ``(B, C_in, H, W) -> (B, C_out, ceil(H / s), ceil(W / s))``."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, padding=0, bias=bias)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv (no bias, "same" padding) -> BatchNorm -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def init_weights(module: nn.Module, linear_std: float | None = None, zero_linear_bias: bool = False) -> None:
    """The standard CIFAR-zoo initialisation (as in RepDistiller / CRD).

    * ``Conv2d``: Kaiming normal, ``fan_out`` mode, ReLU gain; bias (if any) zero;
    * ``BatchNorm``: weight 1, bias 0;
    * ``Linear``: PyTorch's default unless ``linear_std`` is given (then normal(0, ``linear_std``) with
      zero bias); ``zero_linear_bias`` zeroes the bias while keeping the default weight init.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
                nn.init.zeros_(m.bias)
            elif zero_linear_bias:
                nn.init.zeros_(m.bias)
