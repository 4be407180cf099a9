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
from typing import Any

import torch

from ..data import DatasetInfo, DataSplits, DeviceLoader, make_loader
from ..methods import Teacher
from .config import Config, ConfigError

log = logging.getLogger("fusionkd")


def load_outside_teacher(cfg: Config, info: DatasetInfo, device: torch.device) -> Teacher:
    """The frozen teacher ``cfg.teacher_model`` initialised from ``cfg.teacher_weights``."""
    from ..models import MODELS, WeightsError, create_model, load_weights_file

    name = cfg.teacher_model
    entry = MODELS.entry(name)
    kwargs = {"replace_classifier": False} if entry.extras.get("user") else {}
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
        "model_kwargs": {},
        "weights": cfg.teacher_weights,
        "weights_note": report.describe() if report is not None else "the object's own weights",
        "data": None,
        "method": None,
        "test_accuracy": None,
        "val_accuracy": None,
    }
    return Teacher(model=model, model_name=name, meta=meta)


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
        raise ConfigError(
            f"the teacher {teacher.model_name!r} ({cfg.teacher_weights or cfg.teacher or 'its own weights'}) gets "
            f"{acc:.2f}% on "
            f"the {split} split ({n} images), no better than chance (threshold {threshold:.2f}%: "
            f"{check['threshold_rule']}); it would teach nothing. Check that the weights are the trained ones, "
            f"that the teacher expects images normalised with this run's mean {list(info.mean)} and std "
            f"{list(info.std)}, and that its classifier's outputs are this run's {len(info.classes)} classes in "
            f"this order ({', '.join(info.classes[:5])}{', ...' if len(info.classes) > 5 else ''}); or lower "
            "teacher_min_accuracy if this accuracy is really expected")
    return check
