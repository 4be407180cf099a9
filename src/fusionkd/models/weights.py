"""Weights from a file, for any network: :func:`load_weights_file` (the config key ``weights=FILE``).

Accepted files (all read as data only):

* a plain ``state_dict`` saved with ``torch.save`` (``.pth`` / ``.pt`` / ``.bin`` / ``.pth.tar``):
  torchvision's and timm's released weights, or ``torch.save(model.state_dict(), ...)``; read with
  ``weights_only=True``.
  A dict that wraps the state dict under ``state_dict`` / ``model`` / ``model_state_dict`` / ``net`` is
  unwrapped, and a ``module.`` prefix that every key has (a ``DataParallel`` / DDP save) is stripped;
* a ``.safetensors`` file (needs the ``safetensors`` package: ``pip install safetensors``);
* a fusionkd checkpoint (``best.pt`` / ``last.pt`` / an exported ``.pt``): its deployed network.

The keys are the network's own, or, for the CIFAR zoo, those of RepDistiller's / mdistiller's model code
(the community's teacher files, e.g. ``resnet32x4_vanilla/ckpt_epoch_240.pth``): such a file is recognised,
its keys are mapped by name with every shape checked, and the log says so (:mod:`fusionkd.models.community`).

Two mismatches are resolved, and logged; every other one is a :class:`WeightsError` naming the keys (the
network's body is checked before its classifier, so a file of another network is named as such):

* **a classifier of another size** (ImageNet's 1000 classes into a 200-class network): the final linear
  layer (``model.classifier_key``) keeps its fresh initialisation (only when ``replace_classifier``);
* **the first convolution's input channels**: 3-channel weights into a 1-channel network are summed over
  the input channels, 1-channel weights into a 3-channel network are repeated and divided by 3 (what timm
  does), so that a grey image gives the activations its RGB copy would.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import WeightsError

log = logging.getLogger("fusionkd")

#: file name endings that ``weights=`` accepts (``.pth.tar``: PyTorch's ImageNet example and many papers' code)
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".pth.tar")
_WRAPPERS = ("state_dict", "model", "model_state_dict", "net", "module")


@dataclass
class WeightsReport:
    """What :func:`load_weights_file` did."""

    path: str
    kind: str  #: "state_dict", "safetensors" or "fusionkd checkpoint"
    loaded: int  #: tensors copied from the file
    replaced_classifier: str | None = None  #: e.g. "fc: 1000 -> 10 classes (fresh initialisation)"
    adapted_first_conv: str | None = None  #: e.g. "conv1.weight: 3 -> 1 input channels (summed)"
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = [f"{self.loaded} tensors from {self.path} ({self.kind})"]
        parts += [p for p in (self.replaced_classifier, self.adapted_first_conv) if p]
        return "; ".join(parts + list(self.notes))


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """``(state_dict, kind, notes)`` of a weights file; raises :class:`WeightsError` for anything else."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file {str(p)!r} does not exist")
    notes: list[str] = []
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise WeightsError(f"{p} is a .safetensors file, which needs the safetensors package: "
                               "pip install safetensors (or save it with torch.save as a .pth)") from e
        try:
            return dict(load_file(str(p), device="cpu")), "safetensors", notes
        except Exception as e:  # safetensors raises its own SafetensorError for damaged files
            raise WeightsError(f"{p} is not a readable .safetensors file: {e}") from e
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"{p} holds Python objects other than tensors, which fusionkd does not execute "
            f"(torch.load weights_only=True refused it: {str(e).splitlines()[0]}). Save the weights as a plain "
            "state_dict: torch.save(model.state_dict(), 'weights.pth')") from e
    except Exception as e:
        raise WeightsError(f"{p} is not a readable torch file: {type(e).__name__}: {e}") from e
    kind = "state_dict"
    if isinstance(obj, dict) and str(obj.get("format", "")).startswith("fusionkd"):
        dep = obj.get("deploy") or {}
        if not _is_tensor_dict(dep.get("state_dict")):
            raise WeightsError(f"{p} is a fusionkd checkpoint without a deployed network ('deploy' entry)")
        obj, kind = dep["state_dict"], "fusionkd checkpoint"
        notes.append(f"the deployed {dep.get('model')!r} of the checkpoint")
    elif isinstance(obj, dict) and not _is_tensor_dict(obj):
        for key in _WRAPPERS:
            if _is_tensor_dict(obj.get(key)):
                obj = obj[key]
                notes.append(f"state dict taken from the file's {key!r} entry")
                break
    if not _is_tensor_dict(obj):
        what = type(obj).__name__ if not isinstance(obj, dict) else f"a dict with keys {list(obj)[:8]}"
        raise WeightsError(f"{p} holds {what}, not a state dict of tensors (accepted: a torch.save'd "
                           f"state_dict, possibly under one of {', '.join(_WRAPPERS)}; a .safetensors file; "
                           "a fusionkd checkpoint)")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
        notes.append("'module.' prefix stripped")
    check_finite(state, p)
    return state, kind, notes


def nonfinite_tensors(state: dict[str, Any]) -> list[str]:
    """The keys of ``state`` (nested mappings as dotted keys) whose floating tensors hold NaN or inf."""
    bad: list[str] = []
    for key, value in state.items():
        if isinstance(value, dict):
            bad += [f"{key}.{k}" for k in nonfinite_tensors(value)]
        elif isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()) \
                and value.numel() and not bool(torch.isfinite(value).all()):
            bad.append(str(key))
    return bad


def check_finite(state: dict[str, Any], source: str | Path) -> None:
    """Refuse weights with NaN/inf values where they are read, naming the tensors (otherwise they reach
    training's NaN guard, whose message can only blame the learning rate)."""
    bad = nonfinite_tensors(state)
    if bad:
        shown = ", ".join(bad[:6]) + (f" (+{len(bad) - 6} more)" if len(bad) > 6 else "")
        raise WeightsError(f"{source} holds non-finite values (NaN or inf) in {len(bad)} tensor(s): {shown}. "
                           "Such weights cannot train or predict; the file was saved from a diverged run or is "
                           "damaged")


def classifier_key(model: nn.Module) -> str | None:
    """Dotted state-dict prefix of the network's final linear layer (``fc``, ``head.fc``, ``classifier.1``)."""
    key = getattr(model, "classifier_key", None)
    return key if isinstance(key, str) else None


def _first_conv_key(model: nn.Module, own: dict[str, torch.Tensor]) -> str | None:
    in_chans = getattr(model, "in_chans", None)
    for key, value in own.items():
        if key.endswith("weight") and value.dim() == 4:
            return key if in_chans is None or value.shape[1] == in_chans else None
    return None


def _show(xs: list[str]) -> str:
    return ", ".join(xs[:6]) + (f" (+{len(xs) - 6} more)" if len(xs) > 6 else "")


def load_weights_file(model: nn.Module, path: str | Path, *, replace_classifier: bool = True,
                      what: str | None = None) -> WeightsReport:
    """Initialise ``model`` in place from the weights file ``path`` (see the module docstring).

    Args:
        model: the network (a zoo model, a :class:`~fusionkd.models.HookBackbone`, any module).
        path: the file.
        replace_classifier: keep the network's own final linear layer when the file's has another shape
            (or is absent); with ``False`` that is an error (a teacher must predict the run's classes).
        what: how to call the network in messages.

    Raises:
        WeightsError: unreadable file, or keys missing / unexpected / of another shape (named).
    """
    from .community import NONE_OF_THEM, identify, read_layout, repdistiller_layout
    from .hook import HookBackbone
    from .tokens import TokenBackbone

    state, kind, notes = read_state_dict(path)
    what = what or f"the {type(model).__name__}"
    head = classifier_key(model)
    if isinstance(model, (HookBackbone, TokenBackbone)):  # the file holds the wrapped module's own keys (``fc.weight``)
        model, head = model.module, model.head_name
    own = model.state_dict()
    state, layout, note = read_layout(model, state, path, what)
    if note:
        notes.append(note)
    file_keys = list(state)  # the file's keys (renamed to the network's), before anything is filled in
    report = WeightsReport(str(path), kind, 0, notes=tuple(notes))
    conv = _first_conv_key(model, own)
    if conv is not None and conv in state:
        w, o = state[conv], own[conv]
        if w.dim() == 4 and w.shape[0] == o.shape[0] and w.shape[2:] == o.shape[2:] and w.shape[1] != o.shape[1]:
            if o.shape[1] == 1:
                state[conv] = w.sum(dim=1, keepdim=True)
                report.adapted_first_conv = f"{conv}: {w.shape[1]} -> 1 input channel (summed over channels)"
            elif w.shape[1] == 1:
                state[conv] = w.repeat(1, o.shape[1], 1, 1) / o.shape[1]
                report.adapted_first_conv = (f"{conv}: 1 -> {o.shape[1]} input channels (repeated, divided by "
                                             f"{o.shape[1]})")
    head_keys = [k for k in own if head is not None and k.startswith(head + ".")]
    # the body first: a file of another network (or in an unknown layout) is refused naming its keys, whatever
    # its classifier holds
    missing = [k for k in own if k not in head_keys and k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in file_keys if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} in the file vs {tuple(own[k].shape)}" for k in own
              if k not in head_keys and k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"missing {_show(missing)}" if missing else "",
                 f"unexpected {_show(unexpected)}" if unexpected else "",
                 f"shape mismatch {_show(shapes)}" if shapes else ""]
        known = repdistiller_layout(model)
        layouts = (f" Files are read in fusionkd's layout or in {known.source} / mdistiller's for this network "
                   f"({known.network}: {known.sample()} ...)." if known is not None else "")
        found = identify(state) or (NONE_OF_THEM if known is not None else "")
        raise WeightsError(
            f"the weights in {path} do not fit {what}: " + "; ".join(p for p in parts if p)
            + f". The network's keys start with {_show(list(own)[:3])}; the file's with {_show(file_keys[:3])}."
            + layouts + (" " + found if found else ""))
    if head_keys and any(k not in state or state[k].shape != own[k].shape for k in head_keys):
        file_shape = tuple(state[head_keys[0]].shape) if head_keys[0] in state else None
        if layout is not None and file_shape is not None:
            file_head = f"{head!r} ({layout.classifier!r} in {layout.source} layout)"
        else:
            file_head = repr(head)
        if replace_classifier:
            for k in head_keys:
                state.pop(k, None)
            fresh = own[head_keys[0]].shape[0]
            theirs = f"the file's has shape {file_shape}" if file_shape else "the file has none"
            report.replaced_classifier = (
                f"classifier {file_head} replaced: {theirs}, this network predicts {fresh} classes, so it keeps "
                "its fresh initialisation")
            for k in head_keys:
                state[k] = own[k]
        else:
            theirs = f"the file's is {file_shape}" if file_shape else "the file has none"
            raise WeightsError(
                f"the weights in {path} do not fit {what}: its classifier {file_head} has shape "
                f"{tuple(own[head_keys[0]].shape)} ({own[head_keys[0]].shape[0]} classes) but {theirs}; a teacher "
                "must be trained for this run's classes")
    for k, v in own.items():  # files saved before BatchNorm counted its batches lack these; torch fills them too
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = v
    model.load_state_dict({k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in state.items()})
    report.loaded = len(state) - (len(head_keys) if report.replaced_classifier else 0)
    return report
