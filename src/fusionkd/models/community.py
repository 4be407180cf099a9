"""The community's CIFAR teacher files, read by name: RepDistiller's and mdistiller's state-dict layout.

Nearly every knowledge-distillation paper since 2020 starts from the CIFAR-100 teachers of RepDistiller
(Tian et al., ICLR 2020, https://github.com/HobbitLong/RepDistiller): the files its ``train_teacher.py``
writes, ``torch.save``'d dicts whose ``'model'`` entry is the network's ``state_dict()``
(``ckpt_epoch_240.pth``: ``{'epoch', 'model', 'accuracy', 'optimizer'}``; ``<model>_best.pth``:
``{'epoch', 'model', 'best_acc', 'optimizer'}``; ``<model>_last.pth`` also holds the argparse ``opt``
object, which ``weights_only`` loading refuses). mdistiller (https://github.com/megvii-research/mdistiller)
redistributes those teachers as ``cifar_teachers.tar`` (``resnet32x4_vanilla/ckpt_epoch_240.pth`` ...) and
loads them with ``torch.load(path)["model"]``; its ``mdistiller/models/cifar`` is RepDistiller's model
code with the same module names, so both give the same keys.

The zoo's CIFAR networks compute what RepDistiller's do, tensor for tensor, but name their modules
``stem`` / ``stages`` / ``head``. :func:`repdistiller_layout` spells out, for a zoo network, the name that
each of its tensors has in RepDistiller's code. The names are built from the network's own modules, block
by block and layer by layer (``stages.2.4.conv1`` is ``layer3.4.conv1``; VGG's stage 3 is RepDistiller's
``block3`` and ``block4``), never from the order of the keys. :func:`read_layout` recognises such a file
(more of its keys are RepDistiller's names for this network than fusionkd's own), checks every tensor's
shape against the network's (a classifier for another class count and a first convolution for other input
channels are left to :func:`~fusionkd.models.load_weights_file`, which replaces or adapts them) and renames
the keys; a file in that layout that does not fit is refused naming its keys in its own names, and the
covered network it holds when it is one (:func:`identify`).

Covered (zoo name: RepDistiller's name): ``resnet8/14/20/32/44/56/110``, ``resnet8x4``, ``resnet32x4``
(``resnet.py``); ``resnet18``: ``ResNet18``, ``resnet50``: ``ResNet50`` (``resnetv2.py``);
``wrn_16_1/16_2/40_1/40_2`` (``wrn.py``); ``vgg8/11/13/16/19``: ``vgg8_bn`` ... ``vgg19_bn`` (``vgg.py``; the
``batch_norm=False`` variants: ``vgg8`` ...); ``mobilenetv2``: ``mobile_half`` (``mobilenetv2.py``). Not
covered: ``ShuffleV1`` / ``ShuffleV2`` (not in the zoo).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError
from .mobilenetv2 import MobileNetV2
from .resnet import Bottleneck, ResNet
from .vgg import VGG, VGG_CONFIGS
from .wrn import WideResNet

SOURCE = "RepDistiller's"

#: zoo name -> RepDistiller's (and mdistiller's) name of the same network
COVERED: dict[str, str] = {
    **{f"resnet{d}": f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": "resnet8x4",
    "resnet32x4": "resnet32x4",
    "resnet18": "ResNet18",
    "resnet50": "ResNet50",
    **{n: n for n in ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")},
    **{n: f"{n}_bn" for n in VGG_CONFIGS},
    "mobilenetv2": "mobile_half",
}


@dataclass(frozen=True)
class Layout:
    """A zoo network's tensors under the names another code base gives them.

    Attributes:
        source: whose layout (``"RepDistiller's"``).
        network: that code base's name of the network (``resnet32x4``, ``ResNet50``, ``vgg13_bn``,
            ``mobile_half``).
        names: the file's key -> the network's key, for every tensor of the network (``num_batches_tracked``
            included).
        classifier: the file's prefix of the final linear layer (``fc``, ``linear``, ``classifier``,
            ``classifier.0``).
        first_conv: the file's key of the first convolution's weight.
    """

    source: str
    network: str
    names: dict[str, str] = field(repr=False)
    classifier: str
    first_conv: str

    def sample(self) -> str:
        keys = list(self.names)
        return ", ".join(keys[:2] + [f"{self.classifier}.weight"])


# ----------------------------------------------------------------------------- module names per family
def _resnet(model: ResNet) -> tuple[str, dict[str, str]] | None:
    """RepDistiller's ``resnet.py`` (3 stages: ``layer1..3``, ``downsample``, ``fc``) or ``resnetv2.py``
    (4 stages from a 64-channel stem: ``layer1..4``, ``shortcut``, ``linear``)."""
    blocks = [len(stage) for stage in model.stages]
    bottleneck = isinstance(model.stages[0][0], Bottleneck)
    expansion = 4 if bottleneck else 1
    planes = [info.channels // expansion for info in model.stage_info]
    stem = model.stem[0].out_channels
    if len(blocks) == 3 and len(set(blocks)) == 1:
        v2 = False
        depth = (9 if bottleneck else 6) * blocks[0] + 2
        suffix = {(16, 16, 32, 64): "", (32, 64, 128, 256): "x4"}.get((stem, *planes))
        network = (f"resnet{depth}{suffix}" if suffix is not None and not bottleneck else
                   f"ResNet({depth}, {[stem, *planes]}, {'bottleneck' if bottleneck else 'basicblock'!r})")
    elif len(blocks) == 4 and stem == 64 and planes == [64, 128, 256, 512]:
        v2 = True
        known = {((2, 2, 2, 2), False): "ResNet18", ((3, 4, 6, 3), False): "ResNet34",
                 ((3, 4, 6, 3), True): "ResNet50", ((3, 4, 23, 3), True): "ResNet101",
                 ((3, 8, 36, 3), True): "ResNet152"}
        network = known.get((tuple(blocks), bottleneck),
                            f"ResNet({'Bottleneck' if bottleneck else 'BasicBlock'}, {blocks})")
    else:
        return None
    pairs = {"stem.0": "conv1", "stem.1": "bn1", "head.fc": "linear" if v2 else "fc"}
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage):
            ours, theirs = f"stages.{i}.{j}", f"layer{i + 1}.{j}"
            for name, child in block.named_children():
                if name == "shortcut":
                    for k, _ in child.named_children():  # conv, BN of the projection
                        pairs[f"{ours}.shortcut.{k}"] = f"{theirs}.{'shortcut' if v2 else 'downsample'}.{k}"
                else:
                    pairs[f"{ours}.{name}"] = f"{theirs}.{name}"
    return network, pairs


def _wrn(model: WideResNet) -> tuple[str, dict[str, str]]:
    """RepDistiller's ``wrn.py``: ``conv1``, ``block1..3.layer.J`` (``convShortcut``), ``bn1``, ``fc``."""
    pairs = {"stem": "conv1", "head.pre.0": "bn1", "head.fc": "fc"}
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage):
            for name, _ in block.named_children():
                pairs[f"stages.{i}.{j}.{name}"] = (f"block{i + 1}.layer.{j}."
                                                   f"{'convShortcut' if name == 'shortcut' else name}")
    return f"wrn_{model.depth}_{model.widen}", pairs


def _vgg(model: VGG) -> tuple[str, dict[str, str]]:
    """RepDistiller's ``vgg.py``: ``block0..4`` (conv, [BN,] ReLU per width: the J-th conv of a block is
    its layer ``3 J`` with BatchNorm, ``2 J`` without) and ``classifier``; stage 3 here is its ``block3`` and
    ``block4``."""
    step = 3 if model.batch_norm else 2
    stage_blocks = [[0], [1], [2], [3, 4]]
    pairs = {"head.fc": "classifier"}
    for s, stage in enumerate(model.stages):
        slots = iter([(b, j) for b in stage_blocks[s] for j in range(len(model.config[b]))])
        slot = None
        for idx, layer in stage.named_children():
            if isinstance(layer, nn.Conv2d):
                slot = next(slots)
                pairs[f"stages.{s}.{idx}"] = f"block{slot[0]}.{step * slot[1]}"
            elif isinstance(layer, nn.BatchNorm2d) and slot is not None:
                pairs[f"stages.{s}.{idx}"] = f"block{slot[0]}.{step * slot[1] + 1}"
    name = next((n for n, cfg in VGG_CONFIGS.items() if cfg == model.config), None)
    network = f"{name}{'_bn' if model.batch_norm else ''}" if name else f"VGG({model.config})"
    return network, pairs


def _mobilenetv2(model: MobileNetV2) -> tuple[str, dict[str, str]]:
    """RepDistiller's ``mobilenetv2.py``: ``conv1``, ``blocks.G.J.conv`` (the seven inverted-residual groups
    that the stages here regroup), ``conv2`` and ``classifier.0``."""
    pairs = {"stem.0": "conv1.0", "stem.1": "conv1.1", "head.pre.0": "conv2.0", "head.pre.1": "conv2.1",
             "head.fc": "classifier.0"}
    slots = [(g, j) for g, n in enumerate(model.group_sizes) for j in range(n)]
    ours = [(s, m) for s, stage in enumerate(model.stages) for m in range(len(stage))]
    if len(slots) != len(ours):
        raise RuntimeError(f"MobileNetV2 has {len(ours)} blocks for groups of {model.group_sizes}")
    for (s, m), (g, j) in zip(ours, slots, strict=True):
        for idx, _ in model.stages[s][m].conv.named_children():
            pairs[f"stages.{s}.{m}.conv.{idx}"] = f"blocks.{g}.{j}.conv.{idx}"
    if model.width_mult == 0.5 and model.expand_ratio == 6:
        network = "mobile_half"
    else:
        network = f"mobilenetv2_T_w(T={model.expand_ratio}, W={model.width_mult})"
    return network, pairs


def repdistiller_layout(model: nn.Module) -> Layout | None:
    """The names RepDistiller's (= mdistiller's) code gives this zoo network's tensors; ``None`` for a
    network it has no counterpart of (ImageNet-family and user networks, which have their own layouts)."""
    if isinstance(model, WideResNet):
        found: tuple[str, dict[str, str]] | None = _wrn(model)
    elif isinstance(model, ResNet):
        found = _resnet(model)
    elif isinstance(model, VGG):
        found = _vgg(model)
    elif isinstance(model, MobileNetV2):
        found = _mobilenetv2(model)
    else:
        return None
    if found is None:
        return None
    network, pairs = found
    names: dict[str, str] = {}
    first_conv = None
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module not in pairs:  # every tensor must have a name; a gap is a bug in the tables above
            raise RuntimeError(f"no {SOURCE} name for {type(model).__name__}'s tensor {key!r}")
        theirs = f"{pairs[module]}.{leaf}"
        if theirs in names:
            raise RuntimeError(f"two tensors of {type(model).__name__} named {theirs!r} in {SOURCE} layout")
        names[theirs] = key
        if first_conv is None and leaf == "weight" and value.dim() == 4:
            first_conv = theirs
    return Layout(SOURCE, network, names, pairs["head.fc"], first_conv or "")


# ----------------------------------------------------------------------------- reading a file
def _show(xs: list[str]) -> str:
    return ", ".join(xs[:6]) + (f" (+{len(xs) - 6} more)" if len(xs) > 6 else "")


def read_layout(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, what: str
                ) -> tuple[dict[str, torch.Tensor], Layout | None, str | None]:
    """``(state, layout, note)``: ``state`` renamed to the network's keys when the file is in RepDistiller's
    layout for this network (``layout`` and the note for the log then say so), else unchanged.

    Raises:
        WeightsError: the file is in that layout but not of this network (its missing, unexpected and
            mis-shaped keys named in the file's own names, with the covered network it holds, if any).
    """
    layout = repdistiller_layout(model)
    if layout is None:
        return state, None, None
    own = model.state_dict()
    theirs = sum(k in layout.names for k in state)
    if theirs == 0 or theirs <= sum(k in own for k in state):
        return state, None, None
    missing = [k for k in layout.names if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in layout.names]
    shapes = []
    for key, value in state.items():
        target = layout.names.get(key)
        if target is None or tuple(value.shape) == tuple(own[target].shape):
            continue
        want = own[target].shape
        if key.startswith(layout.classifier + "."):
            continue  # another class count: replaced (weights=) or refused (a teacher) by the loader
        if key == layout.first_conv and value.dim() == 4 and value.shape[0] == want[0] \
                and value.shape[2:] == want[2:]:
            continue  # other input channels: adapted by the loader
        shapes.append(f"{key}: {tuple(value.shape)} in the file vs {tuple(want)}")
    if missing or unexpected or shapes:
        parts = [f"missing {_show(missing)}" if missing else "",
                 f"unexpected {_show(unexpected)}" if unexpected else "",
                 f"shape mismatch {_show(shapes)}" if shapes else ""]
        raise WeightsError(
            f"the weights in {path} are in {layout.source} layout (keys {layout.sample()} ...) but do not fit "
            f"{what}, which is {layout.source} {layout.network}: " + "; ".join(p for p in parts if p)
            + ". " + (identify(state) or NONE_OF_THEM))
    renamed = {layout.names[k]: v for k, v in state.items()}
    note = f"read {layout.source} layout ({layout.network}): {len(state)} tensors mapped by name, shapes checked"
    return renamed, layout, note


Shapes = dict[str, tuple[int, ...]]

#: keys that a file of each family has (RepDistiller's name, fusionkd's name): :func:`identify` builds only
#: the networks of the families a file can be
_MARKERS = {
    "resnet": ("layer1.0.conv1.weight", "stages.0.0.conv1.weight"),
    "wrn": ("block1.layer.0.conv1.weight", "stem.weight"),
    "vgg": ("block0.0.weight", "stages.0.0.weight"),
    "mobilenetv2": ("blocks.0.0.conv.0.weight", "stages.0.0.conv.0.weight"),
}


@functools.cache
def _signature(name: str) -> tuple[Shapes, Shapes, Layout]:
    """``(fusionkd's keys and shapes, RepDistiller's keys and shapes, the layout)`` of a covered zoo network,
    classifier and ``num_batches_tracked`` left out (built on the meta device: no memory, no initialisation)."""
    from .registry import create_model

    with torch.device("meta"):
        model = create_model(name, num_classes=1, in_chans=3)
    layout = repdistiller_layout(model)
    if layout is None:
        raise RuntimeError(f"{name!r} is listed as covered but has no {SOURCE} layout")
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()
           if not k.endswith("num_batches_tracked") and not k.startswith("head.fc.")}
    theirs = {t: own[o] for t, o in layout.names.items() if o in own}
    return own, theirs, layout


def _same(file: Shapes, net: Shapes, first_conv: str) -> bool:
    """The same keys and shapes, the first convolution's input channels aside."""
    if file.keys() != net.keys():
        return False
    return all(s == net[k] or (k == first_conv and len(s) == 4 and s[:1] + s[2:] == net[k][:1] + net[k][2:])
               for k, s in file.items())


def identify(state: dict[str, torch.Tensor]) -> str | None:
    """A sentence naming the covered zoo network whose tensors the file holds (in fusionkd's or RepDistiller's
    layout, for any class count and input channels); ``None`` when it holds none of them."""
    body = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    for name, theirs_name in COVERED.items():
        family = next(f for f in _MARKERS if name.startswith(f))
        if not any(k in body for k in _MARKERS[family]):
            continue
        own, theirs, layout = _signature(name)
        ours_first = layout.names[layout.first_conv]
        for shapes, how, head, first in ((theirs, f"{SOURCE} {theirs_name}", layout.classifier, layout.first_conv),
                                         (own, f"fusionkd's {name}", "head.fc", ours_first)):
            rest = {k: s for k, s in body.items() if not k.startswith(head + ".")}
            if _same(rest, shapes, first):
                classes = state.get(f"{head}.weight")
                n = f" for {classes.shape[0]} classes" if classes is not None and classes.dim() == 2 else ""
                return f"The file holds {how}{n}: the zoo's {name!r} (teacher_model={name} / model={name})"
    return None


NONE_OF_THEM = "Its keys and shapes are those of none of the covered networks (" + ", ".join(COVERED) + ")"
