"""A vision transformer on the backbone contract: :class:`TokenBackbone`.

A ViT's blocks output tokens ``(B, N, D)``, not maps. :class:`TokenBackbone` offers as stage maps the tokens
of ``num_stages`` evenly spaced blocks (the last block always among them), the class/register tokens dropped
and the patch tokens laid out on the patch grid: ``(B, D, H/p, W/p)``, stride ``p`` (the patch size) for
every stage. It reads them with the wrapped model's own ``forward_intermediates`` (timm's API), so nothing
here imports timm.

The classifier reads the class token (or the pooled tokens after the final norm), which a map does not
carry. So ``forward_head`` gives the model's own logits only for the last map that ``forward_stages`` just
produced (the same tensor object), and refuses any other map (a fused map, a map of another batch). That is
what every offline method does with a teacher (kd, dkd, dist read the logits, fitnet, at, mfkd, reviewkd,
crd the maps); methods that apply the head to maps of their own making (the online and self families) are
refused for such a network before training (``tokens=True`` in the model's registry entry).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import StageInfo


def evenly_spaced(depth: int, n: int) -> list[int]:
    """``n`` block indices of ``0..depth-1`` spread evenly, the last block last (12, 4 -> 2, 5, 8, 11)."""
    n = max(1, min(n, depth))
    return sorted({round((i + 1) * depth / n) - 1 for i in range(n)})


class TokenHead:
    """What the methods that read ``net.head`` would get: refused with the reason (not a module)."""

    def __init__(self, fc: nn.Module) -> None:
        self.fc = fc

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("a vision transformer's head reads its class token, not a pooled stage map; methods "
                         "that pool or classify stage maps themselves (online and self families) cannot train it")


class TokenBackbone(nn.Module):
    """A token model (timm ``VisionTransformer``-like: ``forward_intermediates``, ``num_prefix_tokens``,
    ``patch_embed``, ``blocks``) seen through the backbone contract.

    Args:
        module: the network; ``forward(x)`` is ``module(x)``; its state dict keys are ``module.<own key>``.
        num_stages: how many blocks' tokens are offered as stage maps (evenly spaced, the last included).
        head_name: the classifier's attribute (``"head"`` in timm), for weights files.
    """

    def __init__(self, module: nn.Module, num_stages: int = 4, head_name: str = "head") -> None:
        super().__init__()
        for attr in ("forward_intermediates", "forward_head", "patch_embed", "blocks"):
            if not hasattr(module, attr):
                raise TypeError(f"{type(module).__name__} is not a token model with {attr!r} (timm ViT-like)")
        self.module = module
        self.head_name = head_name
        self.indices = evenly_spaced(len(module.blocks), num_stages)
        embed = module.patch_embed
        patch = getattr(embed, "patch_size", (16, 16))
        self.patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        size = getattr(embed, "img_size", None)
        self.image_size = int(size[0]) if isinstance(size, (tuple, list)) else (int(size) if size else 224)
        proj = getattr(embed, "proj", None)
        self.in_chans = int(proj.in_channels) if isinstance(proj, nn.Conv2d) else int(getattr(module, "in_chans", 3))
        self.num_classes = int(getattr(module, "num_classes", 0))
        dim = int(getattr(module, "embed_dim", 0) or getattr(module, "num_features", 0))
        self.stage_info = [StageInfo(f"blocks.{i}", dim, self.patch) for i in self.indices]
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_stages(self) -> int:
        return len(self.indices)

    @property
    def num_features(self) -> int:
        return int(getattr(self.module, "num_features", self.stage_info[-1].channels))

    @property
    def classifier_key(self) -> str:
        return f"module.{self.head_name}"

    @property
    def head(self) -> TokenHead:
        return TokenHead(self.module.get_submodule(self.head_name))

    def forward(self, x: torch.Tensor) -> Any:
        return self.module(x)

    def forward_stages(self, x: torch.Tensor, raw: bool = False) -> list[torch.Tensor]:
        """``(B, C, H, W)`` -> ``[(B, D, H/p, W/p)]``: the patch tokens of the chosen blocks on the patch grid
        (raw block outputs, before the final norm; ``raw`` changes nothing)."""
        final, maps = self.module.forward_intermediates(x, indices=self.indices, norm=False, output_fmt="NCHW")
        maps = list(maps)
        self._last = (maps[-1], final)
        return maps

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """The model's own logits, for the last map ``forward_stages`` just produced (that tensor only)."""
        last = self._last
        if last is None or x is not last[0]:
            raise ValueError(
                f"{type(self.module).__name__} classifies its class token, which a stage map does not carry: "
                "forward_head only gives its logits for the last map forward_stages just produced; a method "
                "that classifies other maps (fused maps, branches: the online and self families) cannot use it")
        self._last = None
        return self.module.forward_head(last[1])

    def split(self, at_stage: int) -> tuple[nn.Module, nn.Module]:
        raise TypeError("a vision transformer (TokenBackbone) cannot be split into trunk and tail: methods that "
                        "grow branches on a shared trunk (ffl_s, one) need a CNN")


# --------------------------------------------------------------------------- torchvision's VisionTransformer
def is_torchvision_vit(net: nn.Module) -> bool:
    """torchvision's ``VisionTransformer`` (``vit_b_16`` ...): ``conv_proj``, ``class_token``, ``encoder``."""
    enc = getattr(net, "encoder", None)
    return all(hasattr(net, a) for a in ("conv_proj", "class_token", "heads", "image_size", "patch_size")) \
        and hasattr(enc, "layers") and hasattr(enc, "pos_embedding")


class _PatchEmbed:
    """What :class:`TokenBackbone` reads of a timm ``patch_embed``: patch size, image size, projection."""

    def __init__(self, net: nn.Module) -> None:
        self.patch_size = (int(net.patch_size), int(net.patch_size))
        self.img_size = (int(net.image_size), int(net.image_size))
        self.proj = net.conv_proj
        self.strict_img_size = True


def _tv_forward_intermediates(self: nn.Module, x: torch.Tensor, indices: list[int], norm: bool = False,
                              output_fmt: str = "NCHW") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """torchvision's ``VisionTransformer.forward`` up to the final norm, keeping the patch tokens of the blocks
    ``indices`` on the patch grid; returns ``(final tokens, maps)`` like timm's ``forward_intermediates``."""
    x = self._process_input(x)
    n = x.shape[0]
    x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
    x = self.encoder.dropout(x + self.encoder.pos_embedding)
    side = int(self.image_size) // int(self.patch_size)
    maps = []
    for i, layer in enumerate(self.encoder.layers):
        x = layer(x)
        if i in indices:
            maps.append(x[:, 1:].transpose(1, 2).reshape(n, -1, side, side))
    return self.encoder.ln(x), maps


def _tv_forward_head(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.heads(x[:, 0])


def as_token_model(net: nn.Module) -> nn.Module:
    """torchvision's ``VisionTransformer`` given the timm-like surface :class:`TokenBackbone` reads, in place and
    without new submodules or parameters (its state dict keys stay torchvision's): ``blocks`` (its encoder
    layers), ``patch_embed``, ``num_prefix_tokens = 1`` (the class token), ``embed_dim``,
    ``forward_intermediates`` and ``forward_head`` (the class token after the final norm, through ``heads``)."""
    import types

    object.__setattr__(net, "blocks", net.encoder.layers)  # not registered: no second copy of the keys
    object.__setattr__(net, "patch_embed", _PatchEmbed(net))
    net.num_prefix_tokens = 1
    net.embed_dim = net.num_features = int(net.hidden_dim)
    net.forward_intermediates = types.MethodType(_tv_forward_intermediates, net)
    net.forward_head = types.MethodType(_tv_forward_head, net)
    return net
