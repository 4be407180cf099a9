"""Validation of a resolved :class:`Config`, before any work starts: names that exist, values in range,
compatible combinations, the run folder's name, the teacher keys and the weights files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import ConfigError
from .schema import CHOICES, RANGES, Config, numeric_fields
from .types import build_options


def _check_ranges(cfg: Config) -> None:
    for key in numeric_fields():
        section, _, attr = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, attr)
        if value is None:
            continue
        r = RANGES[key]
        if not r.contains(value):
            why = f" ({r.why})" if r.why else ""
            raise ConfigError(f"{key}={value!r} is out of range: accepted {r.describe()}{why}")


def native_image_size(cfg: Config) -> int | None:
    """The side of the images the run will see, when the config alone tells (else None)."""
    if cfg.image_size is not None:
        return cfg.image_size
    from ...data import DATASETS

    return DATASETS.entry(cfg.dataset).extras.get("image_size")


def check_run_name(cfg: Config) -> None:
    """``name`` must be a relative path that stays inside ``out_dir`` (no ``..``, not absolute, not empty)."""
    if cfg.name is None:
        return
    p = Path(cfg.name)
    if not cfg.name.strip() or p.is_absolute() or cfg.name.startswith("~") or ".." in p.parts \
            or p.parts in ((), (".",)):
        raise ConfigError(
            f"name={cfg.name!r} must be a relative folder name inside out_dir={cfg.out_dir!r} (e.g. "
            "'fmnist/ffl-run1'): no absolute path, no '..', not empty; use out_dir= to write elsewhere"
        )
    # a symlink inside out_dir could still lead elsewhere: compare where the two really are
    out = Path(cfg.out_dir).expanduser().resolve()
    real = (Path(cfg.out_dir).expanduser() / cfg.name).resolve()
    from ..rundir import is_marked

    # a link to a run folder fusionkd made (compare's shared baseline runs) leads to fusionkd's own files
    if not real.is_relative_to(out) and not is_marked(real):
        raise ConfigError(
            f"name={cfg.name!r} leads outside out_dir={cfg.out_dir!r}: {Path(cfg.out_dir) / cfg.name} resolves to "
            f"{real} (a symbolic link on the way). Run folders stay inside out_dir; to write there, set "
            f"out_dir={real.parent}"
        )


def _choice(value: str, key: str) -> None:
    accepted = CHOICES[key]
    if value not in accepted:
        raise ConfigError(f"{key}={value!r} is not accepted; choose one of: {', '.join(accepted)}")


def validate(cfg: Config) -> None:
    """Reject names that do not exist, values out of range and incompatible combinations."""
    from ...data import DATASETS, dataset_options
    from ...methods import METHODS
    from ...models import MODELS, is_deploy_only
    from ...registry import UnknownNameError

    if cfg.plugins:
        from ...plugins import load_files

        load_files(cfg.plugins)
    for key in ("optimizer", "schedule", "precision", "lr_scale", "progress", "eval_test", "normalize"):
        _choice(getattr(cfg, key), key)
    _choice(cfg.augment.padding_mode, "augment.padding_mode")
    try:
        method_cls = METHODS.get(cfg.method)
        MODELS.entry(cfg.model)
        for m in cfg.models or []:
            MODELS.entry(m)
        DATASETS.entry(cfg.dataset)
    except UnknownNameError as e:
        users = [m for m in [cfg.model, *(cfg.models or [])] if m.startswith("user-") and m not in MODELS]
        hint = (f" ({users[0]!r} names a user module object: register it again in this process with "
                f"fusionkd.models.register_module(module, name={users[0]!r}) before resuming)" if users else "")
        raise ConfigError(f"{e}{hint}") from None
    for m in [cfg.model, *(cfg.models or [])]:
        if is_deploy_only(m):
            raise ConfigError(f"model={m!r} is the deployed network of ffl/mfef with options.deploy=fused, not a "
                              "network to train; train method=ffl (or mfef) options.deploy=fused instead")
    check_external_models(cfg, method_cls.family)
    _check_ranges(cfg)
    if cfg.warmup_epochs > cfg.epochs:
        raise ConfigError(f"warmup_epochs={cfg.warmup_epochs:g} is longer than the run (epochs={cfg.epochs})")
    size = native_image_size(cfg)
    if size is not None:
        for key, value in (("augment.cutout", cfg.augment.cutout), ("augment.crop_padding", cfg.augment.crop_padding)):
            if value > size:
                raise ConfigError(f"{key}={value} is larger than the {size}x{size} images of this run; accepted "
                                  f"0..{size}")
    check_run_name(cfg)
    from ..trackers import check_tracker

    check_tracker(cfg)
    if cfg.nesterov and cfg.optimizer != "sgd":
        raise ConfigError("nesterov=true needs optimizer=sgd")
    if cfg.nesterov and cfg.momentum <= 0:
        raise ConfigError("nesterov=true needs momentum > 0")
    if cfg.milestones is not None:
        if cfg.schedule != "multistep":
            raise ConfigError(f"milestones are only used by schedule=multistep, not {cfg.schedule!r}")
        if sorted(cfg.milestones) != cfg.milestones or any(m < 1 or m >= cfg.epochs for m in cfg.milestones):
            raise ConfigError(
                f"milestones must be increasing epochs between 1 and epochs-1={cfg.epochs - 1}, "
                f"got {cfg.milestones}"
            )
    dev = cfg.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"device={dev!r} is not accepted; use auto, cpu, cuda or cuda:N")
    resolved = resolve_device(dev)  # device=cuda without CUDA is refused here, before any work
    if cfg.precision == "fp16" and resolved.type != "cuda":
        raise ConfigError("precision=fp16 needs a CUDA device; on CPU use precision=bf16 or fp32")
    # method-specific checks
    if method_cls.needs_teacher and not (cfg.teacher or cfg.teacher_model or cfg.teachers):
        raise ConfigError(
            f"method {cfg.method!r} distils from a pre-trained teacher: pass --teacher CHECKPOINT "
            f"(a best.pt/last.pt from `fusionkd train --method baseline ...`), or teacher_model=NAME "
            f"teacher_weights=FILE for a teacher from outside fusionkd"
        )
    check_teacher_keys(cfg, method_cls.needs_teacher)
    check_several_teachers(cfg, method_cls)
    check_head_parts(cfg, method_cls)
    if getattr(method_cls, "needs_indices", False) and (cfg.augment.mixup > 0 or cfg.augment.cutmix > 0):
        raise ConfigError(f"method {cfg.method!r} keeps a state per training sample (it is given each sample's "
                          "dataset index), and a MixUp/CutMix image is two samples at once: set augment.mixup=0 "
                          "and augment.cutmix=0 for it")
    if cfg.models and not getattr(method_cls, "accepts_models", False):
        accepting = [e.name for e in METHODS.entries() if getattr(e.obj, "accepts_models", False)]
        raise ConfigError(
            f"method {cfg.method!r} trains one network; `models` (a list of peers) is accepted by: "
            f"{', '.join(accepting) or '(no installed method)'}"
        )
    accepted = dataset_options(cfg.dataset)
    unknown = sorted(set(cfg.dataset_options) - set(accepted))
    if unknown:
        raise ConfigError(f"dataset {cfg.dataset!r} has no option(s) {', '.join(unknown)}; accepted "
                          f"dataset_options: {', '.join(accepted) or '(none)'}")
    build_options(method_cls, cfg.options, cfg.method)


def check_external_models(cfg: Config, family: str) -> None:
    """Networks whose registry entry needs a given input size (``image_size``: a timm vision transformer at
    its package default) or whose head reads tokens (``tokens``: it cannot classify maps of a method's own
    making, as the online and self families do) are refused where they cannot serve, before any work."""
    from ...models import EXTERNAL_PREFIXES
    from ...registry import UnknownNameError

    if cfg.teacher_model_kwargs and not cfg.teacher_model:
        raise ConfigError("teacher_model_kwargs go with teacher_model=NAME; a teacher=CHECKPOINT is rebuilt with the "
                          "keyword arguments it recorded")
    if cfg.pretrained and cfg.weights:
        raise ConfigError("give either pretrained=true (the package's published weights) or weights=FILE, not both")
    if cfg.pretrained and not cfg.model.startswith(tuple(EXTERNAL_PREFIXES)):
        raise ConfigError(f"pretrained=true asks torchvision or timm for their published weights, and model="
                          f"{cfg.model!r} is not a torchvision:NAME / timm:NAME network; initialise it from a file "
                          "with weights=FILE")
    trained = [cfg.model, *(cfg.models or [])]
    for key, name in [*(("model", m) for m in trained), ("teacher_model", cfg.teacher_model)]:
        if name is None:
            continue
        kw_key = "teacher_model_kwargs" if key == "teacher_model" else "model_kwargs"
        try:
            extras = check_input_size(cfg, f"{key}={name!r}", name, getattr(cfg, kw_key), kw_key)
        except UnknownNameError:
            continue  # reported by check_teacher_keys
        if extras.get("tokens") and key == "model" and family in ("online", "self"):
            raise ConfigError(f"{key}={name!r} is a vision transformer: its head reads the class token, not a "
                              f"stage map, and the {family} methods classify maps of their own making (fused maps, "
                              "branches); it can be trained by baseline and be a teacher or student of the "
                              "offline methods")


def check_input_size(cfg: Config, what: str, name: str, kwargs: dict[str, Any], kw_key: str) -> dict[str, Any]:
    """The keyword arguments of network ``name`` (checked by its package, on the meta device) and its fixed
    input size, if it has one, against the run's, before any work; returns its registry extras with them.

    Raises:
        UnknownNameError: ``name`` is not registered (the caller decides who reports it).
        ConfigError: a keyword the network does not take, or one fusionkd sets itself; a size mismatch.
    """
    from ...models.registry import model_extras

    try:
        extras = model_extras(name, kwargs, kw_key)  # (an unknown name, a KeyError, passes through)
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from None
    need, size = extras.get("image_size"), native_image_size(cfg)
    if need and size is not None and int(size) != int(need):
        raise ConfigError(f"{what} takes {need}x{need} images (its img_size) but this run's are {size}x{size}: set "
                          f"{kw_key}={{img_size: {size}}} (with a patch_size that divides it), or image_size={need}")
    return extras


def check_head_parts(cfg: Config, method_cls: type) -> None:
    """A method that rebuilds the head from ``pre -> pooling -> fc`` (byot) refuses, before any data is loaded,
    a torchvision/timm network whose head is its own tail: the network is built once here (with 10 classes; any
    other failure is left to the real build, which names it)."""
    from ...models import EXTERNAL_PREFIXES, create_model

    if not getattr(method_cls, "rebuilds_head", False):
        return
    for name in [cfg.model, *(cfg.models or [])]:
        if not name.startswith(tuple(EXTERNAL_PREFIXES)):
            continue
        try:
            head = create_model(name, num_classes=10, in_chans=3, **cfg.model_kwargs).head
        except Exception:  # noqa: BLE001 - reported, with its reason, where the network is really built
            continue
        try:
            head.pre, head.fc  # noqa: B018 - the parts the method rebuilds the head from
        except ValueError as e:
            raise ConfigError(f"method {cfg.method!r}, model={name!r}: {e}") from None


def check_teacher_keys(cfg: Config, needs_teacher: bool) -> None:
    """The teacher keys: one source only, names that exist, weights where they are needed."""
    from ...models import MODELS
    from ...registry import UnknownNameError

    given = [k for k in ("teacher", "teacher_model", "teacher_weights", "teacher_min_accuracy")
             if getattr(cfg, k) is not None]
    if given and not needs_teacher:
        raise ConfigError(f"method {cfg.method!r} does not use a teacher; remove {', '.join(given)}")
    if cfg.teacher_weights and not cfg.teacher_model:
        raise ConfigError("teacher_weights goes with teacher_model=NAME (the teacher's architecture); with "
                          "teacher=CHECKPOINT the checkpoint holds both")
    if cfg.teacher and cfg.teacher_model:
        raise ConfigError("give either teacher=CHECKPOINT (a fusionkd run) or teacher_model=NAME "
                          "teacher_weights=FILE (a teacher from outside fusionkd), not both")
    if cfg.teacher_model:
        try:
            entry = MODELS.entry(cfg.teacher_model)
        except UnknownNameError as e:
            raise ConfigError(f"teacher_model: {e}") from None
        if not entry.extras.get("user") and not cfg.teacher_weights:
            raise ConfigError(f"teacher_model={cfg.teacher_model!r} is a zoo model and needs teacher_weights=FILE "
                              "(its trained weights); a freshly initialised teacher teaches nothing")


TEACHER_ITEM_KEYS = ("model", "weights", "kwargs")


def split_teacher_item(item: str | dict[str, Any]) -> tuple[str | None, str, dict[str, Any]]:
    """An item of ``teachers``: ``(None, CHECKPOINT, {})``; ``(NAME, FILE, {})`` for ``NAME=FILE``; or
    ``(NAME, FILE, KWARGS)`` for a mapping ``{model: NAME, weights: FILE, kwargs: {...}}`` (the package's keyword
    arguments of a teacher from outside fusionkd, as ``teacher_model_kwargs`` are for one teacher).

    Raises:
        ConfigError: a mapping with an unknown key, without ``model`` or ``weights``, or with values of the
            wrong type.
    """
    if isinstance(item, dict):
        unknown = [k for k in item if k not in TEACHER_ITEM_KEYS]
        if unknown:
            raise ConfigError(f"teachers: {item!r}: unknown key {unknown[0]!r}; a mapping takes "
                              f"{', '.join(TEACHER_ITEM_KEYS)} (model and weights required)")
        name, file, kwargs = item.get("model"), item.get("weights"), item.get("kwargs") or {}
        if not isinstance(name, str) or not name.strip() or not isinstance(file, str) or not file.strip():
            raise ConfigError(f"teachers: {item!r}: an item given as a mapping needs model: NAME and weights: FILE "
                              "(strings); a fusionkd checkpoint is given as its path alone")
        if not isinstance(kwargs, dict):
            raise ConfigError(f"teachers: {item!r}: kwargs must be a mapping of the package's keyword arguments, "
                              f"got {kwargs!r}")
        return name.strip(), file.strip(), dict(kwargs)
    name, eq, file = str(item).partition("=")
    return (name.strip(), file.strip(), {}) if eq else (None, str(item), {})


def check_several_teachers(cfg: Config, method_cls: type) -> None:
    """``teachers=[...]`` (and ``teacher_mix``): two or more, one teacher source, a method that only reads the
    teacher's logits, and mixing weights that are finite, >= 0, not all 0 and one per teacher."""
    import math

    from ...methods import METHODS
    from ...models import MODELS
    from ...registry import UnknownNameError

    if cfg.teacher_mix is not None and not cfg.teachers:
        raise ConfigError("teacher_mix weighs the logits of teachers=[...]; give the teachers too")
    if not cfg.teachers:
        return
    accepted = sorted(e.name for e in METHODS.entries()
                      if e.obj.needs_teacher and not getattr(e.obj, "reads_teacher_maps", True))
    if not method_cls.needs_teacher or getattr(method_cls, "reads_teacher_maps", True):
        raise ConfigError(f"method {cfg.method!r} cannot learn from several teachers: "
                          + ("it uses no teacher" if not method_cls.needs_teacher else
                             "it reads the teacher's stage maps or features, and several teachers give only their "
                             "averaged logits")
                          + f"; the methods that take teachers=[...] are {', '.join(accepted)}")
    if cfg.teacher or cfg.teacher_model or cfg.teacher_weights:
        raise ConfigError("give teachers=[...] or one teacher (teacher=CHECKPOINT, or teacher_model=NAME "
                          "teacher_weights=FILE), not both")
    if len(cfg.teachers) < 2:
        raise ConfigError(f"teachers takes two or more teachers, got {len(cfg.teachers)}; one teacher is "
                          "teacher=CHECKPOINT (or teacher_model=NAME teacher_weights=FILE)")
    for item in cfg.teachers:
        name, file, kwargs = split_teacher_item(item)
        if not file:
            raise ConfigError(f"teachers: {item!r} names no file (give a checkpoint, or NAME=FILE for a teacher "
                              "from outside fusionkd)")
        if name is None:
            continue
        try:
            MODELS.entry(name)
        except UnknownNameError as e:
            raise ConfigError(f"teachers: {item!r}: {e}") from None
        check_input_size(cfg, f"teachers item {name!r}", name, kwargs, "kwargs")
    if cfg.teacher_mix is not None:
        mix = list(cfg.teacher_mix)
        if len(mix) != len(cfg.teachers):
            raise ConfigError(f"teacher_mix has {len(mix)} weights for {len(cfg.teachers)} teachers; give one per "
                              "teacher")
        if not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in mix) or sum(mix) <= 0:
            raise ConfigError(f"teacher_mix={mix}: the weights must be finite numbers >= 0, not all 0 (they are "
                              "normalised to sum to 1)")


def check_files(cfg: Config) -> None:
    """Weights files named by a new run must exist and be of an accepted kind (not re-checked on resume,
    where the checkpoint holds the weights)."""
    from ...models.weights import WEIGHT_SUFFIXES

    for key in ("weights", "teacher_weights"):
        value = getattr(cfg, key)
        if value is None:
            continue
        p = Path(value)
        if not p.is_file():
            raise ConfigError(f"{key}={value!r} does not exist (expected a weights file: "
                              f"{', '.join(WEIGHT_SUFFIXES)}, or a fusionkd checkpoint)")
        if not p.name.endswith(WEIGHT_SUFFIXES):  # a name, not p.suffix: ".pth.tar" is two suffixes
            raise ConfigError(f"{key}={value!r}: files ending in {p.suffix or '(nothing)'} are not read; accepted: "
                              f"{', '.join(WEIGHT_SUFFIXES)} (a torch.save'd state dict, safetensors, or a fusionkd "
                              "checkpoint)")


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} was asked for but CUDA is not available here; use device=cpu")
    return torch.device(name)
