"""torchvision and timm networks by name: ``model=torchvision:resnet18``, ``teacher_model=timm:vit_tiny_patch16_224``.

The model registry resolves a name with the prefix ``torchvision:`` or ``timm:`` that is not registered yet on
its first lookup (:meth:`fusionkd.registry.Registry.add_resolver`): the package is imported only then, the
name is checked against the package's own list (close matches offered), and an entry for that exact name is
registered, so that configs, compare's ``--models``, run folders, checkpoints, resumes, ``eval`` and
``export`` name it like any zoo model. Without the package the name is refused, naming the package and
``pip install 'fusionkd[interop]'``. Nothing here imports either package before such a name is looked up.

Building (each call a freshly initialised network; ``**kwargs``: the config's ``model_kwargs`` /
``teacher_model_kwargs``, passed to the package's constructor, the package's defaults otherwise):

* ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, num_classes=..., **kwargs)`` (image
  classifiers only); for ``in_chans != 3`` the first ``Conv2d`` is replaced by one with ``in_chans`` inputs
  (same other settings).
* ``timm:NAME[.TAG]``: ``timm.create_model(NAME, pretrained=False, num_classes=..., in_chans=..., **kwargs)``.

``num_classes``, ``in_chans`` and ``pretrained`` are fusionkd's (the data, the ``pretrained`` key) and never
taken from the keyword arguments. :meth:`ExternalFactory.check_kwargs` builds the network on the meta device
(no weights initialised, nothing downloaded) so that a keyword the package refuses is named before any work,
and a ViT's input size follows its ``img_size``. ``pretrained=True`` (config ``pretrained=true``, a new run's
main network only) asks the package for its published weights: timm's ``create_model(pretrained=True)``
(which adapts the classifier, ``in_chans`` and a changed ``img_size``/``patch_size`` itself), torchvision's
``DEFAULT`` weights file loaded like ``weights=FILE`` (the classifier replaced when the classes differ). A
download that fails (no internet) is refused in one line that suggests ``weights=FILE``.

Then the network is put on the backbone contract: a CNN through a :class:`~fusionkd.models.HookBackbone` (stages
from timm's ``feature_info`` or torchvision's ResNet names by :func:`~fusionkd.models.infer_stages`, or, for
torchvision networks built as a ``features``/``layers``/``trunk_output`` sequence + ``classifier``/``fc``
(MobileNetV2/V3, EfficientNet, MNASNet, RegNet), the last module of each stride from 4 on), dry-run on a
``DRY_RUN_SIZE`` square input (224 when the network cannot take 32); a timm vision transformer (a model with
``forward_intermediates`` and class/register tokens) through :class:`~fusionkd.models.tokens.TokenBackbone`,
whose registry entry says ``tokens=True`` and ``image_size`` (the package's default ``img_size``, which the
run's images must have).
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UnknownNameError
from .adapt import infer_stages
from .features import FeaturesBackbone, has_features_api
from .hook import HookBackbone
from .registry import MODELS, RESERVED_KWARGS
from .tokens import TokenBackbone, as_token_model, is_torchvision_vit
from .tv_tails import FAMILIES, REFUSED

INSTALL = "pip install 'fusionkd[interop]'"
PREFIXES = {"torchvision:": "torchvision", "timm:": "timm"}
#: side of the dry-run input that measures a CNN's stage strides (224 when the network cannot take it)
DRY_RUN_SIZE = 32
#: sequences of blocks whose strided outputs are a torchvision network's stages, and its classifiers
TRUNKS = ("features", "layers", "trunk_output")
HEADS = ("classifier", "fc")
SUPPORTED = ("torchvision ResNet/ResNeXt/Wide-ResNet (layer1..4 + fc), MobileNetV2/V3, EfficientNet, MNASNet, "
             "RegNet (a block sequence + a classifier after global pooling), ConvNeXt, Swin, DenseNet, VGG, "
             "AlexNet, MaxViT, ShuffleNetV2 (their own head, models/tv_tails.py); timm CNNs with feature_info; timm "
             "vision transformers (forward_intermediates + class tokens) and timm networks with their own "
             "forward_intermediates/forward_head (ConvNeXt, EfficientNet, Swin ...); torchvision's VisionTransformer")


def import_package(package: str, name: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise UnknownNameError(f"model {name!r} needs {package}, which is not installed here: {INSTALL} "
                               f"(or pip install {package}); {type(e).__name__}: {e}") from None


def close_names(arch: str, known: list[str], package: str, name: str) -> UnknownNameError:
    close = difflib.get_close_matches(arch, known, n=5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return UnknownNameError(f"unknown model {name!r}: {arch!r} is not a {package} image classifier.{hint} "
                            f"({package} lists {len(known)}; see its list_models())")


def first_conv(net: nn.Module) -> tuple[nn.Module, str, nn.Conv2d] | None:
    """``(parent, attribute, conv)`` of the first ``Conv2d`` of ``net`` (in module order)."""
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            parent_name, _, attr = name.rpartition(".")
            return (net.get_submodule(parent_name) if parent_name else net), attr, m
    return None


def set_in_chans(net: nn.Module, in_chans: int, name: str) -> None:
    """Replace the first ``Conv2d`` by one with ``in_chans`` inputs (fresh weights, same other settings)."""
    found = first_conv(net)
    if found is None:
        raise ValueError(f"model {name!r} has no Conv2d whose inputs could be set to {in_chans} channels")
    parent, attr, old = found
    if old.in_channels == in_chans:
        return
    if old.groups != 1:
        raise ValueError(f"model {name!r}: its first convolution is grouped and cannot take {in_chans} channels")
    setattr(parent, attr, nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding,
                                    old.dilation, 1, old.bias is not None, old.padding_mode))


def is_token_model(net: nn.Module) -> bool:
    """A timm vision transformer: its blocks output tokens, read through ``forward_intermediates``."""
    return all(hasattr(net, a) for a in ("forward_intermediates", "num_prefix_tokens", "patch_embed", "blocks"))


def trunk_stages(net: nn.Module, size: int) -> tuple[list[str], str] | None:
    """``(stages, head)`` of a torchvision network built as a block sequence (``features``...) + a classifier
    after global pooling: the last block of each stride from 4 on, measured on a ``size`` dry run."""
    children = dict(net.named_children())
    trunk = next((t for t in TRUNKS if isinstance(children.get(t), nn.Sequential)), None)
    head = next((h for h in HEADS if h in children and h != trunk), None)
    if trunk is None or head is None:
        return None
    blocks = list(children[trunk].named_children())
    sides: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: sides.__setitem__(n, out.shape[-1]))
             for n, m in blocks]
    flags = {m: m.training for m in net.modules()}
    first = first_conv(net)
    chans = first[2].in_channels if first else 3
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, chans, size, size))
    finally:
        for h in hooks:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    by_stride: dict[int, str] = {}
    for n, _ in blocks:
        if n in sides:
            stride = max(1, round(size / sides[n]))
            if stride >= 4:
                by_stride[stride] = f"{trunk}.{n}"
    return ([by_stride[s] for s in sorted(by_stride)], head) if by_stride else None


def stages_of(net: nn.Module, size: int, name: str) -> tuple[list[str], str]:
    try:
        return infer_stages(net)
    except ValueError:
        pass
    found = trunk_stages(net, size)
    if found is None:
        raise ValueError(f"model {name!r} ({type(net).__name__}): fusionkd cannot tell its stages. Supported: "
                         f"{SUPPORTED}. Other networks: build the object and wrap it as fusionkd.models."
                         "HookBackbone(module, stage_names=[...], head_name='...')")
    return found


def token_extras(net: nn.Module) -> dict[str, Any]:
    """``{"tokens": True, "image_size": N}`` for a timm ViT whose input size is fixed, ``{}`` for a CNN."""
    if is_torchvision_vit(net):  # a fixed image_size (its keyword), checked by its own forward
        return {"tokens": True, "image_size": int(net.image_size)}
    if type(net).__name__ == "MaxVit" and hasattr(net, "blocks"):  # torchvision's: fixed by its input_size keyword
        return {"image_size": 4 * int(net.blocks[0].grid_size[0])}
    size = fixed_input_size(net)
    if not is_token_model(net):  # a hierarchical transformer (Swin) may have a fixed input size too
        return {"image_size": size} if size and has_features_api(net) else {}
    return {"tokens": True, **({"image_size": size} if size else {})}


def fixed_input_size(net: nn.Module) -> int | None:
    """The side a timm transformer's patch embedding insists on (its ``img_size``), None when it takes any."""
    embed = getattr(net, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if not size or not getattr(embed, "strict_img_size", True) or getattr(net, "dynamic_img_size", False):
        return None
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def first_line(e: BaseException, limit: int = 200) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:limit]}"


class ExternalFactory:
    """The registered factory of ``torchvision:NAME`` / ``timm:NAME``:
    ``factory(num_classes, in_chans, pretrained=False, **package_kwargs)``."""

    def __init__(self, package: str, arch: str, name: str) -> None:
        self.package = package
        self.arch = arch
        self.name = name
        self._checked: dict[str, dict[str, Any]] = {}

    def construct(self, num_classes: int, in_chans: int, kwargs: dict[str, Any]) -> nn.Module:
        """The package's network, fresh weights."""
        if self.package == "timm":
            timm = import_package("timm", self.name)
            return timm.create_model(self.arch, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                     **kwargs)
        tv = import_package("torchvision", self.name)
        net = tv.models.get_model(self.arch, weights=None, num_classes=num_classes, **kwargs)
        if in_chans != 3:
            set_in_chans(net, in_chans, self.name)
        return net

    def check_kwargs(self, kwargs: dict[str, Any], key: str = "model_kwargs") -> dict[str, Any]:
        """Build the network with ``kwargs`` on the meta device (nothing initialised or downloaded): a keyword
        the package refuses raises ``ValueError`` naming it; returns the extras as they are with them."""
        memo = repr(sorted(kwargs.items()))
        if memo not in self._checked:
            try:
                with torch.device("meta"):
                    probe = self.construct(10, 3, dict(kwargs))
            except (TypeError, ValueError, AssertionError) as e:
                raise ValueError(f"{key}={kwargs}: {self.package} refused them for {self.arch!r} ({first_line(e)})"
                                 ) from None
            except Exception:  # noqa: BLE001 - cannot be built on meta: the kwargs are checked when it is built
                probe = None
            self._checked[memo] = token_extras(probe) if probe is not None else {}
        return dict(self._checked[memo])

    def download_refused(self, e: BaseException) -> ConfigError:
        timm_too = (" (or, for timm, keep pretrained=true with model_kwargs={pretrained_cfg_overlay: {file: FILE}}, "
                    "which timm adapts to in_chans and img_size)") if self.package == "timm" else ""
        return ConfigError(f"pretrained=true: the published weights of {self.name!r} could not be downloaded "
                           f"({first_line(e)}); without internet access give a local weights file instead: "
                           f"weights=FILE (.pth/.safetensors of this network) and pretrained=false{timm_too}")

    def build(self, num_classes: int, in_chans: int, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
        if not pretrained:
            try:
                return self.construct(num_classes, in_chans, kwargs)
            except TypeError as e:
                raise ConfigError(f"model {self.name!r}: {self.package} refused the keyword arguments {kwargs} "
                                  f"({first_line(e)})") from None
        if self.package == "timm":
            timm = import_package("timm", self.name)
            try:
                return timm.create_model(self.arch, pretrained=True, num_classes=num_classes, in_chans=in_chans,
                                         **kwargs)
            except Exception as e:  # noqa: BLE001 - hub/url errors of every kind: refused in one line
                raise self.download_refused(e) from None
        return self.construct(num_classes, in_chans, kwargs)  # torchvision: its file is loaded once wrapped

    def published_file(self) -> Path:
        """torchvision's ``DEFAULT`` weights file of this network, downloaded into torch.hub's cache (or found
        there)."""
        tv = import_package("torchvision", self.name)
        try:
            published = tv.models.get_model_weights(self.arch).DEFAULT
            published.get_state_dict(progress=False)
        except Exception as e:  # noqa: BLE001 - url/hash errors of every kind: refused in one line
            raise self.download_refused(e) from None
        return Path(torch.hub.get_dir()) / "checkpoints" / Path(published.url).name

    def __call__(self, num_classes: int, in_chans: int, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        net = self.wrap(num_classes, in_chans, pretrained, kwargs)
        if pretrained and self.package == "torchvision":
            from .weights import load_weights_file  # as weights=FILE: the classifier replaced, conv1 adapted

            load_weights_file(net, self.published_file(), what=f"the {self.name!r} of this run (pretrained=true)")
        return net

    def features_backbone(self, net: nn.Module, in_chans: int, size: int) -> nn.Module | None:
        """A timm model through its ``forward_intermediates`` / ``forward_head`` (:class:`FeaturesBackbone`), when
        it has them and keeps the contract that way; else None."""
        if self.package != "timm" or not has_features_api(net):
            return None
        features = FeaturesBackbone(net, classifier_name(net))
        try:
            return features if keeps_contract(features, in_chans, size) else None
        except (RuntimeError, ValueError, TypeError, AssertionError):
            return None

    def wrap(self, num_classes: int, in_chans: int, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
        reserved = [k for k in kwargs if k in RESERVED_KWARGS]
        if reserved:
            raise ValueError(f"model {self.name!r}: {reserved[0]!r} is set by fusionkd, not a package keyword here")
        net = self.build(num_classes, in_chans, pretrained, kwargs)
        if is_torchvision_vit(net):
            return TokenBackbone(as_token_model(net), head_name="heads.head")
        if is_token_model(net):
            return TokenBackbone(net)
        kind = type(net).__name__
        if self.package == "torchvision" and kind in REFUSED:
            raise ValueError(f"model {self.name!r} ({kind}) cannot be put on fusionkd's backbone contract: "
                             f"{REFUSED[kind]}. Supported: {SUPPORTED}")
        family = FAMILIES.get(kind) if self.package == "torchvision" else None
        last: Exception | None = None
        for size in (DRY_RUN_SIZE, 224):
            try:
                if family is not None and family.stages:
                    stages, head = list(family.stages), family.head
                else:
                    stages, head = stages_of(net, size, self.name)
                    head = family.head if family is not None else head
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the contract is checked below, strictly
                    hooked = HookBackbone(net, stages, head, input_shape=(in_chans, size, size),
                                          tail=family.tail if family else None,
                                          stage_format=family.stage_format if family else "NCHW")
                if not hooked.keeps_contract:  # its own dry run: a head norm, a final (in-place) ReLU ...
                    raise ValueError(f"its head applied to its last stage map {stages[-1]!r} does not give its own "
                                     f"logits (something runs between them, e.g. a head norm or a final "
                                     f"activation), so the methods that classify stage maps would train another "
                                     f"network than the one deployed")
                return hooked
            except (RuntimeError, IndexError, AssertionError) as e:  # too small an input (timm asserts): the next size
                last = e
            except (ValueError, TypeError) as e:
                features = self.features_backbone(net, in_chans, size)  # timm's own stages and head, where it has them
                if features is not None:
                    return features
                raise ValueError(f"model {self.name!r} ({type(net).__name__}) cannot be put on fusionkd's backbone "
                                 f"contract: {e}. Supported: {SUPPORTED}") from None
        raise ValueError(f"model {self.name!r} did not run on {in_chans}-channel inputs of side {DRY_RUN_SIZE} or "
                         f"224: {last}")


def classifier_name(net: nn.Module) -> str:
    """The dotted name of a timm model's ``get_classifier()`` (``head.fc``, ``classifier`` ...)."""
    fc = net.get_classifier() if callable(getattr(net, "get_classifier", None)) else None
    return next((n for n, m in net.named_modules() if m is fc and n), "head")


def keeps_contract(net: nn.Module, in_chans: int, size: int) -> bool:
    """Whether ``forward_head(forward_stages(x)[-1]) == forward(x)`` on a random batch (eval mode, flags
    restored). Checked on two separate forwards: the stage forward stops at the last stage, so a later
    in-place operation of the wrapped forward (DenseNet's final ``relu(inplace=True)``) cannot alter the
    captured map and hide the difference, as it does within one forward."""
    flags = {m: m.training for m in net.modules()}
    ref = next(net.parameters())
    x = torch.randn(2, in_chans, size, size, generator=torch.Generator().manual_seed(0)).to(ref.device, ref.dtype)
    net.eval()
    try:
        with torch.no_grad():
            head = net.forward_head(net.forward_stages(x)[-1])
            return bool(torch.allclose(head, net(x), rtol=1e-4, atol=1e-5))
    finally:
        for m, flag in flags.items():
            m.training = flag


def resolve_torchvision(name: str) -> tuple[ExternalFactory, str, dict[str, Any]]:
    arch = name[len("torchvision:"):]
    tv = import_package("torchvision", name)
    known = list(tv.models.list_models(module=tv.models))  # the image classifiers (not detection, video...)
    if arch not in known:
        others = list(tv.models.list_models())
        if arch in others:
            raise UnknownNameError(f"model {name!r} is not an image classifier (torchvision lists it among its "
                                   "detection/segmentation/video/optical-flow models); fusionkd trains classifiers")
        raise close_names(arch, known, "torchvision", name)
    extras: dict[str, Any] = {"package": "torchvision"}
    try:  # on the meta device: whether it is a vision transformer, and its input size, with no weights made
        with torch.device("meta"):
            extras.update(token_extras(tv.models.get_model(arch, weights=None)))
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta is probed when built
        pass
    return (ExternalFactory("torchvision", arch, name),
            f"torchvision {tv.__version__} {arch} (package defaults, fresh weights)", extras)


def resolve_timm(name: str) -> tuple[ExternalFactory, str, dict[str, Any]]:
    arch = name[len("timm:"):]
    timm = import_package("timm", name)
    if not arch or not timm.is_model(arch):
        raise close_names(arch, list(timm.list_models()), "timm", name)
    extras: dict[str, Any] = {"package": "timm"}
    try:  # on the meta device: the class and its input size without initialising any weights
        with torch.device("meta"):
            extras.update(token_extras(timm.create_model(arch, pretrained=False)))
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta is probed when built
        pass
    return (ExternalFactory("timm", arch, name),
            f"timm {timm.__version__} {arch} (package defaults, fresh weights)", extras)


MODELS.add_resolver("torchvision:", resolve_torchvision)
MODELS.add_resolver("timm:", resolve_timm)
