"""Teachers from outside fusionkd: ``teacher_model=NAME teacher_weights=FILE``, and the check that they teach.

The alternative to ``teacher=CHECKPOINT`` for every offline method (kd, fitnet, at, mfkd):

* ``teacher_model`` is a zoo name (``imagenet_resnet50``, ``resnet56`` ...) or, from the Python API, a
  network object (registered by :func:`fusionkd.models.register_module`);
* ``teacher_weights`` is a weights file (torchvision / timm ``.pth``, ``.safetensors``, a fusionkd
  checkpoint; for the CIFAR zoo also RepDistiller's / mdistiller's teacher files such as
  ``resnet32x4_vanilla/ckpt_epoch_240.pth``, whose keys are mapped by name, see
  :mod:`fusionkd.models.community`; see :func:`fusionkd.models.load_weights_file`), required for a zoo name
  and optional for an object (which already holds its weights). The file's keys are checked before its
  classifier, so a file of another network is refused naming its keys. Its classifier must predict this
  run's classes: nothing is replaced in a teacher.

Such a teacher carries no record of the data it was trained on, so before the student trains it is
evaluated on the validation split (the training images when there is none) and its accuracy is logged
and kept in the summary (``method_extras.teacher.check``). A teacher that does no better than a constant
guess stops the run: below ``teacher_min_accuracy`` when that is set, else not above the share of the
split's most frequent class by three binomial standard deviations (when that bar is above 100 %, the split
is too small to decide and the check is skipped with a warning). Wrong weights, another normalisation or
another class order all look like that. A ``teacher=CHECKPOINT`` (a fusionkd run) is checked the same way:
its checkpoint records the data it was trained on, but not that it learnt anything.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import DatasetInfo, DataSplits, DeviceLoader, make_loader
from ..methods import METHODS, EnsembleTeacher, Teacher
from .checkpoint import CheckpointError, build_deploy_model, load_checkpoint
from .config import Config, ConfigError
from .config.validate import split_teacher_item

log = logging.getLogger("fusionkd")


def load_outside_teacher(cfg: Config, info: DatasetInfo, device: torch.device) -> Teacher:
    """The frozen teacher ``cfg.teacher_model`` initialised from ``cfg.teacher_weights``."""
    from ..models import MODELS, WeightsError, create_model, load_weights_file

    name = cfg.teacher_model
    entry = MODELS.entry(name)
    kwargs = {"replace_classifier": False} if entry.extras.get("user") else {}
    kwargs.update(cfg.teacher_model_kwargs or {})  # the package's keywords (img_size ...), checked by validate
    try:
        model = create_model(name, num_classes=len(info.classes), in_chans=info.in_chans, **kwargs)
    except ValueError as e:
        raise ConfigError(f"teacher_model={name!r}: {e}") from None
    report = None
    if cfg.teacher_weights:
        try:
            report = load_weights_file(model, cfg.teacher_weights, replace_classifier=False,
                                       what=f"the teacher {name!r} for {len(info.classes)} classes and "
                                            f"{info.in_chans} input channels")
        except WeightsError as e:
            raise ConfigError(f"teacher_weights: {e}") from None
        log.info("teacher %s: %s", name, report.describe())
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    meta = {
        "path": cfg.teacher_weights,
        "source": "teacher_model",
        "model": name,
        "model_kwargs": dict(cfg.teacher_model_kwargs or {}),  # a resumed run rebuilds it with them
        "weights": cfg.teacher_weights,
        "weights_note": report.describe() if report is not None else "the object's own weights",
        "data": None,
        "method": None,
        "test_accuracy": None,
        "val_accuracy": None,
    }
    return Teacher(model=model, model_name=name, meta=meta)


def check_teacher_file(cfg: Config) -> None:
    """A ``teacher=`` / ``teacher_weights=`` file that is not there is refused before the data is loaded
    (or a store prepared), not after."""
    if cfg.teacher and METHODS.get(cfg.method).needs_teacher:
        p = Path(cfg.teacher).expanduser()
        if not (p.is_file() or (p.is_dir() and any((p / n).is_file() for n in ("best.pt", "last.pt")))):
            raise ConfigError(f"teacher={cfg.teacher!r}: no such checkpoint (give a fusionkd best.pt/last.pt, "
                              "an exported .pt, or a run folder holding one)")
    if cfg.teacher_weights and not Path(cfg.teacher_weights).expanduser().is_file():
        raise ConfigError(f"teacher_weights={cfg.teacher_weights!r}: no such file")
    for item in cfg.teachers or [] if METHODS.get(cfg.method).needs_teacher else []:
        name, file, _ = split_teacher_item(item)
        p = Path(file).expanduser()
        ok = p.is_file() or (name is None and p.is_dir() and any((p / n).is_file() for n in ("best.pt", "last.pt")))
        if not ok:
            raise ConfigError(f"teachers: {item!r}: no such " + ("file" if name else
                              "checkpoint (give a fusionkd best.pt/last.pt, an exported .pt, or a run folder)"))


def check_teacher_matches(meta: dict[str, Any], info: DatasetInfo, source: str) -> None:
    """Raise ConfigError naming every way the teacher's data differs from the run's."""
    t = meta.get("data") or {}
    problems = []
    if t.get("name") != info.name:
        problems.append(f"dataset {t.get('name')!r} vs {info.name!r}")
    if list(t.get("classes") or []) != list(info.classes):
        problems.append(f"{len(t.get('classes') or [])} classes vs {len(info.classes)} (or different names)")
    if t.get("in_chans") != info.in_chans:
        problems.append(f"{t.get('in_chans')} input channels vs {info.in_chans}")
    if t.get("image_size") != info.image_size:
        problems.append(f"input size {t.get('image_size')} vs {info.image_size}")
    mean, std = t.get("mean"), t.get("std")
    if mean is None or std is None or len(mean) != len(info.mean) or len(std) != len(info.std):
        if not problems:
            problems.append(f"normalisation mean/std {mean}/{std} vs {info.mean}/{info.std}")
    elif not problems and not (
        np.allclose(mean, info.mean, atol=1e-4) and np.allclose(std, info.std, atol=1e-4)
    ):
        problems.append(f"normalisation mean/std {t.get('mean')}/{t.get('std')} vs {info.mean}/{info.std}")
    if problems:
        raise ConfigError(
            f"the teacher {source} does not match this run's data: " + "; ".join(problems)
            + ". Train the teacher on the same dataset (fusionkd train --method baseline --dataset "
            + f"{info.name} ...) and pass its best.pt"
        )


def warn_if_teacher_saw_validation(teacher_cfg: dict[str, Any] | None, cfg: Config, source: str) -> bool:
    """Log a warning (and return True) when the teacher was not trained with this run's validation split.

    The validation split is carved from the training images with ``val_fraction`` and ``data_seed``; a
    teacher trained with other values (or without a validation split) has most likely trained on this
    run's validation images, which makes the student's validation accuracy, and so the choice of
    ``best.pt``, optimistic. Test accuracy is unaffected (no run ever trains on the test split).
    """
    if cfg.val_fraction <= 0:
        return False
    t = teacher_cfg or {}
    seen = {k: t.get(k) for k in ("val_fraction", "data_seed", "dataset_options")}
    ours = {"val_fraction": cfg.val_fraction, "data_seed": cfg.data_seed,
            "dataset_options": getattr(cfg, "dataset_options", {}) or {}}
    seen["dataset_options"] = seen["dataset_options"] or {}
    if seen == ours:
        return False
    log.warning(
        "the teacher %s was trained with val_fraction=%s, data_seed=%s, dataset_options=%s, but this run holds out "
        "val_fraction=%s, data_seed=%s, dataset_options=%s: the teacher has probably trained on this run's "
        "validation images, so the student's validation accuracy (and the best.pt choice) is optimistic; test "
        "accuracy is unaffected. Train the teacher with the same val_fraction and data_seed to avoid this",
        source, seen["val_fraction"], seen["data_seed"], seen["dataset_options"], ours["val_fraction"],
        ours["data_seed"], ours["dataset_options"],
    )
    return True


def load_teacher(path: str, info: DatasetInfo, device: torch.device, cfg: Config | None = None) -> Teacher:
    """Load a baseline (or any fusionkd) checkpoint's deploy network as a frozen teacher.

    ``cfg`` (the student run's config) enables the check that the teacher did not train on the run's
    validation images (a warning, see :func:`warn_if_teacher_saw_validation`).
    """
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise ConfigError(f"teacher: {e}") from None
    check_teacher_matches(ckpt, info, repr(str(path)))
    teacher_cfg = ckpt.get("config") or {}
    split_warning = warn_if_teacher_saw_validation(teacher_cfg, cfg, repr(str(path))) if cfg is not None else None
    model = build_deploy_model(ckpt).to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    dep = ckpt["deploy"]
    meta = {
        "path": str(path),
        "model": dep["model"],
        "model_kwargs": dict(dep.get("model_kwargs") or {}),
        "data": ckpt.get("data"),
        "method": (ckpt.get("config") or {}).get("method"),
        "test_accuracy": ((ckpt.get("metrics") or {}).get("test") or {}).get(dep.get("head")),
        "val_accuracy": ((ckpt.get("metrics") or {}).get("val") or {}).get(dep.get("head")),
        "val_fraction": teacher_cfg.get("val_fraction"),
        "data_seed": teacher_cfg.get("data_seed"),
        "saw_validation_split": split_warning,
    }
    return Teacher(model=model, model_name=dep["model"], meta=meta)


def teacher_from_meta(meta: dict[str, Any], info: DatasetInfo, device: torch.device) -> Teacher:
    """A teacher network of the recorded architecture, weights to be filled by ``method_state``."""
    from ..models import create_model

    if meta.get("members"):  # several teachers: each rebuilt, then the ensemble (its mix comes with the weights)
        members = [teacher_from_meta(m, info, device).model for m in meta["members"]]
        model = EnsembleTeacher(members, meta.get("mix")).to(device).eval()
        return Teacher(model=model, model_name=meta["model"], meta=dict(meta))

    model = create_model(meta["model"], num_classes=len(info.classes), in_chans=info.in_chans,
                         **dict(meta.get("model_kwargs") or {})).to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model=model, model_name=meta["model"], meta=dict(meta))


def build_teacher(cfg: Config, info: DatasetInfo, device: torch.device,
                  teacher_meta: dict[str, Any] | None = None) -> Teacher:
    """The frozen teacher of a method that needs one: of the recorded architecture (a resumed run, whose
    weights come from its checkpoint), from outside fusionkd (``teacher_model``), or ``teacher=CHECKPOINT``."""
    if teacher_meta is not None:
        return teacher_from_meta(teacher_meta, info, device)
    if cfg.teachers:
        return load_ensemble(cfg, info, device)
    if cfg.teacher_model:
        return load_outside_teacher(cfg, info, device)
    return load_teacher(cfg.teacher, info, device, cfg)


@torch.inference_mode()
def _accuracy(model: torch.nn.Module, loader: DeviceLoader, num_classes: int, amp) -> tuple[float, float, int]:
    """``(accuracy %, share % of the most frequent class, images)`` of ``model`` on ``loader``."""
    correct = torch.zeros((), dtype=torch.long)
    counts = torch.zeros(num_classes, dtype=torch.long)
    for images, labels in loader:
        with amp:
            logits = model(images)
        correct += (logits.argmax(1) == labels).sum().cpu()
        counts += torch.bincount(labels.cpu(), minlength=num_classes)
    n = int(counts.sum())
    return 100.0 * int(correct) / max(n, 1), 100.0 * int(counts.max()) / max(n, 1), n


def check_teacher(teacher: Teacher, splits: DataSplits, cfg: Config, device: torch.device, amp,
                  batch_size: int = 512) -> dict[str, Any]:
    """Evaluate a teacher (from outside fusionkd, or ``teacher=CHECKPOINT``) before training; record the
    result in ``teacher.meta["check"]``.

    Raises:
        ConfigError: the teacher is at chance level (see the module docstring).
    """
    info = splits.info
    use_val = splits.val is not None and len(splits.val) > 0
    data = splits.val if use_val else splits.train
    loader = make_loader(data, info, batch_size=batch_size, train=False, device=device,
                         channels_last=cfg.channels_last)  # in memory or a store alike
    acc, majority, n = _accuracy(teacher.model, loader, len(info.classes), amp)
    p = majority / 100.0
    margin = 300.0 * math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))
    threshold = cfg.teacher_min_accuracy if cfg.teacher_min_accuracy is not None else majority + margin
    split = "validation" if use_val else "training"
    check = {"split": split, "images": n, "accuracy": acc, "constant_guess": majority, "threshold": threshold,
             "threshold_rule": "teacher_min_accuracy" if cfg.teacher_min_accuracy is not None
             else "most frequent class + 3 binomial std"}
    teacher.meta["check"] = check
    teacher.meta["val_accuracy" if use_val else "train_accuracy"] = acc
    log.info("teacher %s on the %s split (%d images): %.2f%% accuracy (a constant guess gets %.2f%%)",
             teacher.model_name, split, n, acc, majority)
    if cfg.teacher_min_accuracy is None and threshold >= 100.0:
        check["undecided"] = f"{n} images are too few to tell a teacher from chance (it would need > 100 %)"
        log.warning("teacher %s: %s; the check is skipped (set teacher_min_accuracy to decide yourself)",
                    teacher.model_name, check["undecided"])
        return check
    if acc <= threshold:
        source = teacher.meta.get("path") or cfg.teacher_weights or cfg.teacher or "its own weights"
        raise ConfigError(
            f"the teacher {teacher.model_name!r} ({source}) gets "
            f"{acc:.2f}% on "
            f"the {split} split ({n} images), no better than chance (threshold {threshold:.2f}%: "
            f"{check['threshold_rule']}); it would teach nothing. Check that the weights are the trained ones, "
            f"that the teacher expects images normalised with this run's mean {list(info.mean)} and std "
            f"{list(info.std)}, and that its classifier's outputs are this run's {len(info.classes)} classes in "
            f"this order ({', '.join(info.classes[:5])}{', ...' if len(info.classes) > 5 else ''}); or lower "
            "teacher_min_accuracy if this accuracy is really expected")
    return check


def start_teacher(teacher: Teacher | None, splits: DataSplits, cfg: Config, device: torch.device, amp,
                  first_start: bool) -> None:
    """At the start of a run: check a new run's teacher (:func:`check_teacher`); name a resumed run's."""
    if teacher is not None and first_start and isinstance(teacher.model, EnsembleTeacher):
        for member, meta in zip(teacher.model.members, teacher.meta["members"]):  # each member, then the mix
            meta["check"] = check_teacher(Teacher(member, meta["model"], meta), splits, cfg, device, amp,
                                          cfg.eval_batch_size)
        check_teacher(teacher, splits, cfg, device, amp, cfg.eval_batch_size)
    elif teacher is not None and first_start:  # outside teachers and teacher=CHECKPOINT alike
        check_teacher(teacher, splits, cfg, device, amp, cfg.eval_batch_size)
    elif teacher is not None:
        acc = teacher.meta.get("test_accuracy")
        log.info("teacher %s (%s), recorded test accuracy %s", teacher.model_name,
                 teacher.meta.get("path"), f"{acc:.2f}%" if acc is not None else "n/a")


def load_ensemble(cfg: Config, info: DatasetInfo, device: torch.device) -> Teacher:
    """``teachers=[...]``: each teacher loaded as ``teacher=`` (a checkpoint) or ``teacher_model=NAME
    teacher_weights=FILE`` (an item ``NAME=FILE``) would load it, then one :class:`EnsembleTeacher`."""
    import dataclasses

    members: list[Teacher] = []
    for item in cfg.teachers:
        name, file, kwargs = split_teacher_item(item)
        if name is None:
            members.append(load_teacher(file, info, device, cfg))
        else:
            one = dataclasses.replace(cfg, teachers=None, teacher_mix=None, teacher_model=name, teacher_weights=file,
                                      teacher_model_kwargs=kwargs)
            try:
                members.append(load_outside_teacher(one, info, device))
            except ConfigError as e:  # named as the item the user wrote, not as teacher_model/teacher_weights
                raise ConfigError(f"teachers item {item!r}: {e}") from None
    try:
        model = EnsembleTeacher([t.model for t in members], cfg.teacher_mix).to(device).eval()
    except ValueError as e:
        raise ConfigError(f"teachers: {e}") from None
    mix = [round(float(w), 6) for w in model.mix]
    label = "ensemble(" + ", ".join(t.model_name for t in members) + ")"
    log.info("teachers: %s, logits mixed with weights %s", label, mix)
    meta = {"path": None, "source": "teachers", "model": label, "model_kwargs": {}, "mix": mix,
            "members": [t.meta for t in members], "test_accuracy": None, "val_accuracy": None}
    return Teacher(model=model, model_name=label, meta=meta)
