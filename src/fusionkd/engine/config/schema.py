"""The run configuration's schema: the :class:`Config` and :class:`AugmentConfig` dataclasses, the accepted
values of the string options (:data:`CHOICES`) and the accepted range of every numeric one (:data:`RANGES`)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


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
    #: several teachers, logits mixed (kd, dkd, dist): checkpoints, NAME=FILE, or {model, weights, kwargs}
    teachers: list[str | dict[str, Any]] | None = None
    teacher_mix: list[float] | None = None  #: weights of ``teachers``' logits (default: equal); normalised to sum 1
    weights: str | None = None  #: weights file that initialises the deployed network (or every peer)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  #: package keyword arguments of model/peers
    teacher_model_kwargs: dict[str, Any] = field(default_factory=dict)  #: same, of teacher_model
    pretrained: bool = False  #: torchvision:/timm: model from its published weights
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
