"""The run configuration: one typed schema shared by the CLI, the YAML files and the Python API.

Resolution order (later wins): the defaults below < the method's published recipe
(``Method.recipe``) < a YAML file (``--config``) < ``key=value`` overrides / API keyword arguments.
Everything is validated before any work starts: unknown keys, unknown names, wrong types and
incompatible combinations raise :class:`ConfigError` with what was wrong and what is accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError


@dataclass
class AugmentConfig:
    """Training-time augmentation, done on whole batches on the device."""

    crop_padding: int = 4  #: pixels of padding for the random crop (0 disables cropping)
    padding_mode: str = "zero"  #: "zero" or "reflect"
    flip: bool = True  #: random horizontal flip
    cutout: int = 0  #: side of the cutout square (0 disables)
    mixup: float = 0.0  #: MixUp Beta(a, a) parameter (0 disables; 0.2-1 typical); labels become soft targets
    cutmix: float = 0.0  #: CutMix Beta(a, a) parameter (0 disables; 1 typical); with mixup, 1/2 of batches each
    mix_prob: float = 1.0  #: probability that a batch is mixed (when mixup or cutmix is on)
    randaugment: int = 0  #: RandAugment ops per image (0 disables; 2 typical)
    randaugment_magnitude: int = 9  #: RandAugment magnitude, 0..30


@dataclass
class Config:
    """Every option of a training run. See ``docs/config.md`` for the full reference."""

    # -- what to train
    method: str = "baseline"  #: registered method name (``fusionkd list``)
    model: str = "resnet20"  #: zoo name of the main network (student / deployed network)
    models: list[str] | None = None  #: peer networks of online methods (heterogeneous FFL)
    teacher: str | None = None  #: checkpoint of a pre-trained teacher (offline methods)
    teacher_model: str | None = None  #: instead of teacher: a model name for a teacher from outside fusionkd
    teacher_weights: str | None = None  #: weights file of teacher_model (.pth/.pt/.safetensors/checkpoint)
    teacher_min_accuracy: float | None = None  #: refuse a teacher below this val accuracy (%); unset: chance
    weights: str | None = None  #: weights file that initialises the deployed network (or every peer)
    options: dict[str, Any] = field(default_factory=dict)  #: the method's own options
    plugins: list[str] | None = None  #: local .py files that register methods/models/datasets (``--plugin``)
    # -- data
    dataset: str = "fashion-mnist"  #: registered dataset name (``fusionkd list``)
    dataset_options: dict[str, Any] = field(default_factory=dict)  #: e.g. synthetic: num_classes, in_chans
    data_dir: str | None = None  #: folder of the dataset files (see docs/data.md for the search order)
    download: bool = False  #: fetch the official archive when missing (CIFAR; needs internet)
    val_fraction: float = 0.1  #: share of train held out for validation (model selection)
    subset: int | None = None  #: stratified training subset size (after the validation split)
    data_seed: int = 0  #: seed of the validation split and subset (fixed across run seeds)
    image_size: int | None = None  #: resize for imagefolder-like data
    normalize: str = "data"  #: "data" (the training split's mean/std) or "imagenet" (for ImageNet weights)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # -- optimisation
    epochs: int = 30  #: length of the run; schedules and ramp-ups scale with it
    batch_size: int = 128  #: training batch (per process under torchrun)
    optimizer: str = "sgd"  #: "sgd" or "adamw"
    lr: float = 0.1  #: base learning rate
    momentum: float = 0.9  #: SGD momentum
    nesterov: bool = False  #: Nesterov momentum (SGD)
    weight_decay: float = 5e-4  #: decay of the networks (a method may give its own modules another)
    schedule: str = "multistep"  #: "multistep", "cosine" or "constant"
    milestones: list[int] | None = None  #: multistep epochs; default 50 % and 75 % of ``epochs``
    gamma: float = 0.1  #: multistep factor
    warmup_epochs: float = 0.0  #: linear warm-up from 0 over this many epochs
    lr_scale: str = "none"  #: "none" or "linear" (lr × world size under torchrun)
    sync_bn: bool = False  #: SyncBatchNorm under torchrun (CUDA only); default: per-rank batch statistics
    grad_clip: float | None = None  #: clip the global gradient norm to this value
    # -- runtime
    device: str = "auto"  #: "auto", "cpu", "cuda" or "cuda:N"
    precision: str = "fp32"  #: "fp32", "bf16" (CPU and CUDA) or "fp16" (CUDA, with a grad scaler)
    channels_last: bool = False
    compile: bool = False  #: torch.compile every network of the method
    threads: int | None = None  #: torch intra-op threads (CPU)
    seed: int = 0  #: seeds torch/numpy/python and the loader (shuffling, augmentation draws)
    eval_every: int = 1  #: evaluate the validation split every N epochs (and always after the last)
    eval_test: str = "end"  #: "end": test split once, on the best-validation and last weights; "every": also each eval
    eval_batch_size: int = 128  #: batch of the evaluation passes (128 was fastest: benchmarks/eval_batch.py)
    # -- output
    out_dir: str = "runs"  #: parent folder of run folders
    name: str | None = None  #: run folder name; default ``{dataset}/{method}-{model}-s{seed}``
    tensorboard: bool = False  #: also write TensorBoard events (needs the tensorboard package)
    tracker: str = "none"  #: experiment trackers, comma-separated: "none", "tensorboard", "mlflow"
    tracker_uri: str | None = None  #: MLflow tracking URI; default ``sqlite:///<out_dir>/mlflow.db``
    tracker_experiment: str | None = None  #: MLflow experiment name; default: the dataset name
    progress: str = "auto"  #: "auto" (bar on a terminal, log lines otherwise), "bar", "log", "none"
    log_every: int = 0  #: steps between progress refreshes; 0: by time (1 s on a terminal); each costs one host sync

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def run_name(self) -> str:
        return self.name or f"{self.dataset}/{self.method}-{self.model}-s{self.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.run_name


#: zoo entries that only rebuild a deployed network (``fusionkd eval/export``) and cannot be trained
DEPLOY_ONLY_MODELS = frozenset({"fused_peers"})

CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("sgd", "adamw"),
    "schedule": ("multistep", "cosine", "constant"),
    "precision": ("fp32", "bf16", "fp16"),
    "lr_scale": ("none", "linear"),
    "progress": ("auto", "bar", "log", "none"),
    "eval_test": ("end", "every"),
    "normalize": ("data", "imagenet"),
    "augment.padding_mode": ("zero", "reflect"),
}


@dataclass(frozen=True)
class Range:
    """The accepted interval of a numeric option: ``lo``/``hi`` (None = unbounded), each end open or closed.

    Every int and float option of :class:`Config` and :class:`AugmentConfig` has one in :data:`RANGES`
    (a test enforces it), and :func:`validate` checks them all before anything is created or loaded.
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""  #: a short reason shown with the refusal

    def contains(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def describe(self) -> str:
        def num(v: float) -> str:
            return f"{int(v):,}" if float(v).is_integer() and abs(v) >= 1e5 else f"{v:g}"

        lo = "-inf" if self.lo is None else num(self.lo)
        hi = "inf" if self.hi is None else num(self.hi)
        left = "(" if self.lo is None or self.lo_open else "["
        right = ")" if self.hi is None or self.hi_open else "]"
        return f"{left}{lo}, {hi}{right}"


#: the accepted range of every numeric option (dotted names for sections); None values are always accepted
#: where the type allows None. Bounds that depend on other options (warm-up vs epochs, cutout vs image size)
#: are checked in :func:`validate` as well.
RANGES: dict[str, Range] = {
    "val_fraction": Range(0.0, 1.0, hi_open=True, why="0 means no validation split"),
    "subset": Range(1, None, why="a number of training images"),
    "data_seed": Range(0, 2**63 - 1),
    "image_size": Range(4, 4096, why="pixels of the square input"),
    "augment.crop_padding": Range(0, None, why="pixels; 0 disables the random crop"),
    "augment.cutout": Range(0, None, why="side of the square in pixels; 0 disables cutout"),
    "augment.mixup": Range(0.0, 100.0, why="the Beta(a, a) parameter; 0 disables MixUp"),
    "augment.cutmix": Range(0.0, 100.0, why="the Beta(a, a) parameter; 0 disables CutMix"),
    "augment.mix_prob": Range(0.0, 1.0, why="a probability"),
    "augment.randaugment": Range(0, 16, why="ops per image; 0 disables RandAugment"),
    "augment.randaugment_magnitude": Range(0, 30, why="RandAugment's magnitude scale"),
    "epochs": Range(1, 1_000_000),
    "batch_size": Range(1, None),
    "lr": Range(0.0, None, lo_open=True, why="a positive learning rate"),
    "momentum": Range(0.0, 1.0, hi_open=True),
    "weight_decay": Range(0.0, 1.0, hi_open=True),
    "gamma": Range(0.0, 1.0, lo_open=True, why="the factor multiplying lr at each milestone"),
    "warmup_epochs": Range(0.0, None, why="0 disables the warm-up; at most epochs"),
    "grad_clip": Range(0.0, None, lo_open=True, why="a positive maximum gradient norm; leave unset for none"),
    "threads": Range(1, 4096),
    "teacher_min_accuracy": Range(0.0, 100.0, why="validation accuracy in percent; unset = better than chance"),
    "seed": Range(0, 2**63 - 1),
    "eval_every": Range(1, None),
    "eval_batch_size": Range(1, None),
    "log_every": Range(0, None, why="0 refreshes by time"),
}


def numeric_fields() -> dict[str, type]:
    """Every int/float option of the schema, by dotted name, with its scalar type."""
    out: dict[str, type] = {}
    for prefix, cls in (("", Config), ("augment.", AugmentConfig)):
        for name, tp in typing.get_type_hints(cls).items():
            scalar = [a for a in (typing.get_args(tp) or (tp,)) if a is not type(None)]
            if len(scalar) == 1 and scalar[0] in (int, float):
                out[prefix + name] = scalar[0]
    return out


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
    from ..data import DATASETS

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
    from .rundir import is_marked  # (here: rundir imports this module)

    # a link to a run folder fusionkd made (compare's shared baseline runs) leads to fusionkd's own files
    if not real.is_relative_to(out) and not is_marked(real):
        raise ConfigError(
            f"name={cfg.name!r} leads outside out_dir={cfg.out_dir!r}: {Path(cfg.out_dir) / cfg.name} resolves to "
            f"{real} (a symbolic link on the way). Run folders stay inside out_dir; to write there, set "
            f"out_dir={real.parent}"
        )


# ---------------------------------------------------------------------- type checking
def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _check(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to ``tp`` (int -> float only) or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {_type_name(args[0])}, got {value!r}")
        return [_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build_dataclass(tp, value, where)
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def build_dataclass(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, type-checking every field and rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=2)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"unknown option {path!r}.{hint} Accepted: {', '.join(names) or '(none)'}")
        kwargs[key] = _check(value, hints[key], path)
    return cls(**kwargs)


# ---------------------------------------------------------------------- merging
def parse_override(text: str) -> tuple[str, Any]:
    """``"augment.flip=false"`` -> ``("augment.flip", False)``; values are read as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. epochs=10, options.peers=3)")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-").replace("-", "_")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key, read_value(raw)


def read_value(raw: str) -> Any:
    """A command-line value read as YAML (``3``, ``false``, ``[1, 2]``, ``{a: 1}``), plus the numbers YAML 1.1
    leaves as strings (``5e-4``, ``1e5``)."""
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:
            return int(value) if value.strip().lstrip("+-").isdigit() else float(value)
        except ValueError:
            return value
    if isinstance(value, list):
        return [read_value(v) if isinstance(v, str) else v for v in value]
    return value


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"augment.flip": False}`` -> ``{"augment": {"flip": False}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            existing = node.get(p)
            if existing is None:
                node[p] = existing = {}
            elif not isinstance(existing, dict):
                raise ConfigError(f"{key!r}: {p!r} is not a section")
            node = existing
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = deep_merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("options", "dataset_options"):
            out[key] = deep_merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's options; ``path`` may also be the name of a shipped preset (``fusionkd list``)."""
    from ..presets import list_presets, preset_path

    p = Path(path)
    if not p.is_file() and preset_path(str(path)) is not None:
        p = preset_path(str(path))
    if not p.is_file():
        names = ", ".join(x["name"] for x in list_presets())
        raise ConfigError(f"config file {str(p)!r} does not exist (nor is it a preset name: {names})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of options, got {type(data).__name__}")
    return data


def resolve_config(
    *layers: dict[str, Any] | None, config_file: str | Path | None = None, overrides: list[str] | None = None
) -> Config:
    """Merge ``layers`` (nested dicts, later wins), a YAML file and ``key=value`` overrides, insert the
    chosen method's recipe under them, then type-check and validate.

    The method's recipe is inserted just above the defaults, so anything the user states wins.
    """
    user: dict[str, Any] = {}
    if config_file is not None:
        user = deep_merge(user, load_yaml(config_file))
    for layer in layers:
        if layer:
            user = deep_merge(user, nest(layer))
    if overrides:
        user = deep_merge(user, nest(dict(parse_override(o) for o in overrides)))
    if user.get("plugins"):
        from ..plugins import load_files

        if not isinstance(user["plugins"], list):
            user["plugins"] = [user["plugins"]]
        user["plugins"] = load_files(user["plugins"])  # absolute paths: resume and workers load them again
    method_name = user.get("method", Config.method)
    recipe: dict[str, Any] = {}
    from ..methods import METHODS  # local import: methods depend on models, config must stay light

    if isinstance(method_name, str) and method_name in METHODS:
        recipe = dict(getattr(METHODS.get(method_name), "recipe", {}) or {})
    if user.get("optimizer", recipe.get("optimizer", Config.optimizer)) != "sgd":
        # a recipe's SGD settings (FFL's Nesterov momentum) belong to SGD: the user's optimizer wins over them
        recipe = {k: v for k, v in recipe.items() if k not in ("nesterov", "momentum")}
    cfg = build_dataclass(Config, deep_merge(nest(recipe), user))
    validate(cfg)
    check_files(cfg)
    return cfg


# ---------------------------------------------------------------------- validation
def _choice(value: str, key: str) -> None:
    accepted = CHOICES[key]
    if value not in accepted:
        raise ConfigError(f"{key}={value!r} is not accepted; choose one of: {', '.join(accepted)}")


def validate(cfg: Config) -> None:
    """Reject names that do not exist, values out of range and incompatible combinations."""
    from ..data import DATASETS
    from ..methods import METHODS
    from ..models import MODELS
    from ..registry import UnknownNameError

    if cfg.plugins:
        from ..plugins import load_files

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
        if m in DEPLOY_ONLY_MODELS:
            raise ConfigError(f"model={m!r} is the deployed network of ffl/mfef with options.deploy=fused, not a "
                              "network to train; train method=ffl (or mfef) options.deploy=fused instead")
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
    from .trackers import check_tracker

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
    if method_cls.needs_teacher and not (cfg.teacher or cfg.teacher_model):
        raise ConfigError(
            f"method {cfg.method!r} distils from a pre-trained teacher: pass --teacher CHECKPOINT "
            f"(a best.pt/last.pt from `fusionkd train --method baseline ...`), or teacher_model=NAME "
            f"teacher_weights=FILE for a teacher from outside fusionkd"
        )
    check_teacher_keys(cfg, method_cls.needs_teacher)
    if cfg.models and not getattr(method_cls, "accepts_models", False):
        accepting = [e.name for e in METHODS.entries() if getattr(e.obj, "accepts_models", False)]
        raise ConfigError(
            f"method {cfg.method!r} trains one network; `models` (a list of peers) is accepted by: "
            f"{', '.join(accepting) or '(no installed method)'}"
        )
    import inspect

    loader = DATASETS.get(cfg.dataset)
    accepted = [p.name for p in inspect.signature(loader).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(cfg.dataset_options) - set(accepted))
    if unknown:
        raise ConfigError(f"dataset {cfg.dataset!r} has no option(s) {', '.join(unknown)}; accepted "
                          f"dataset_options: {', '.join(accepted) or '(none)'}")
    build_options(method_cls, cfg.options, cfg.method)


def check_teacher_keys(cfg: Config, needs_teacher: bool) -> None:
    """The teacher keys: one source only, names that exist, weights where they are needed."""
    from ..models import MODELS
    from ..registry import UnknownNameError

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


def check_files(cfg: Config) -> None:
    """Weights files named by a new run must exist and be of an accepted kind (not re-checked on resume,
    where the checkpoint holds the weights)."""
    from ..models.weights import WEIGHT_SUFFIXES

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


def build_options(method_cls: type, options: dict[str, Any], method_name: str) -> Any:
    """The method's typed ``Options`` dataclass from the ``options:`` mapping."""
    try:
        opts = build_dataclass(method_cls.Options, options or {}, "options")
    except ConfigError as e:
        raise ConfigError(f"method {method_name!r}: {e}") from None
    check = getattr(opts, "validate", None)
    if callable(check):
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"method {method_name!r}: {e}") from None
    return opts


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} was asked for but CUDA is not available here; use device=cpu")
    return torch.device(name)
