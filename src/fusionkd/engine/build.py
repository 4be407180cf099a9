"""Building a run: its data, the method (with its teacher), the loaders, the optimizer and schedule,
precision, and ``torch.compile``; what the engine logs about a run as it starts."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data import DatasetInfo, DataSplits, DeviceLoader, load_dataset
from ..data.store_loader import make_loader
from ..methods import METHODS, Method, MethodContext, count_parameters
from ..models import WeightsError
from . import distributed as D
from .config import Config, ConfigError, build_options
from .hardware import seed_everything
from .normalize import apply_normalize
from .optim import build_optimizer, build_scheduler
from .precision import Precision
from .teachers import build_teacher

log = logging.getLogger("fusionkd")

#: from this input size on, a network that reduces the image only 4-8x (a CIFAR stem) gets a warning
LARGE_INPUT = 128


def build_method(cfg: Config, info: DatasetInfo, device: torch.device,
                 teacher_meta: dict[str, Any] | None = None, load_weights: bool = False,
                 train_labels: Any = None) -> Method:
    """Construct the configured method for data ``info`` (loading the teacher when it needs one).

    ``load_weights``: initialise the networks from ``cfg.weights`` (a new run; a resumed or evaluated one
    gets its weights from the checkpoint). ``train_labels``: the training split's labels, handed to a method
    that ``needs_indices`` as ``ctx.train_labels`` (ignored for the others)."""
    method_cls = METHODS.get(cfg.method)
    options = build_options(method_cls, cfg.options, cfg.method)
    teacher = build_teacher(cfg, info, device, teacher_meta) if method_cls.needs_teacher else None
    ctx = MethodContext(
        model=cfg.model, models=list(cfg.models or []), num_classes=len(info.classes), in_chans=info.in_chans,
        image_size=info.image_size, epochs=cfg.epochs, teacher=teacher,
        weights=cfg.weights if load_weights else None, model_kwargs=dict(cfg.model_kwargs),
        pretrained=bool(cfg.pretrained and load_weights),
        train_labels=(torch.as_tensor(train_labels).long().cpu()
                      if method_cls.needs_indices and train_labels is not None else None),
    )
    method = method_cls(ctx, options)
    return method.to(device)


def warn_small_stride(model: nn.Module, name: str, image_size: int) -> bool:
    """Warn (once per run) when a CIFAR-stem network (3x3 stem, no max-pool: its last map is only 4-8x
    smaller than the image) trains on large images, where it costs ~15x the compute of an ImageNet-stem
    network of the same depth at 224 px. Returns whether it warned."""
    infos = getattr(model, "stage_info", None) or []
    stride = max((int(i.stride) for i in infos), default=0)
    if image_size < LARGE_INPUT or not stride or stride > 8:
        return False
    side = image_size // stride
    log.warning("%s reduces the image only %dx (a CIFAR stem: 3x3 first convolution, no max-pool): at %d px its "
                "last map is %dx%d where an ImageNet-stem network's is %dx%d, so its maps have ~%dx the area and a "
                "step costs about that much more. For images this large use an ImageNet-family network "
                "(imagenet_resnet18/34/50, imagenet_mobilenet_v2) or a preset (fusionkd list)", name, stride,
                image_size, side, side, image_size // 32, image_size // 32, round((32 / stride) ** 2))
    return True


def compile_networks(method: nn.Module) -> int:
    """``torch.compile`` every stem, stage and head of every backbone inside ``method`` (in place,
    state-dict keys unchanged). Stage granularity keeps methods free to call ``forward_stages``."""
    import torch._dynamo

    # Every stage is an nn.Sequential, so all of them share one code object, and dynamo's recompile limit
    # (8 per code object) counts stage instances x train/eval x batch shapes: raise it so that nothing
    # silently falls back to eager.
    cfg_dyn = torch._dynamo.config
    if hasattr(cfg_dyn, "recompile_limit"):
        cfg_dyn.recompile_limit = max(cfg_dyn.recompile_limit, 128)
    else:  # older torch
        cfg_dyn.cache_size_limit = max(cfg_dyn.cache_size_limit, 128)
    if hasattr(cfg_dyn, "accumulated_recompile_limit"):
        cfg_dyn.accumulated_recompile_limit = max(cfg_dyn.accumulated_recompile_limit, 1024)
    done = 0
    for module in method.modules():
        if hasattr(module, "forward_stages") and hasattr(module, "stages"):
            parts = list(module.stages) + [getattr(module, "stem", None), getattr(module, "head", None)]
            for part in parts:
                if isinstance(part, nn.Module) and not getattr(part, "_fusionkd_compiled", False):
                    part.compile()
                    part._fusionkd_compiled = True
                    done += 1
    return done


def data_fingerprint(splits: DataSplits) -> str:
    """A cheap content fingerprint of the data a run read: classes, normalisation, split sizes and the label
    counts of every split (no pass over the pixels). ``fusionkd report`` keeps runs whose fingerprints differ
    in separate rows even when their dataset name is the same (two image folders, two subsets)."""
    parts: dict[str, Any] = {"info": splits.info.to_dict()}
    for name in ("train", "val", "test"):
        split = getattr(splits, name, None)
        labels = getattr(split, "labels", None)
        if labels is None:
            parts[name] = None
            continue
        labels = torch.as_tensor(labels).long().cpu()
        parts[name] = torch.bincount(labels, minlength=len(splits.info.classes)).tolist()
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Run:
    """Everything :func:`build_run` makes for one invocation of a run."""

    splits: DataSplits
    info: DatasetInfo
    fingerprint: str
    method: Method
    deploy_name: str
    train_loader: DeviceLoader
    val_loader: DeviceLoader | None
    test_loader: DeviceLoader | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: Precision
    lr: float
    data_sizes: dict[str, int]


def load_data(cfg: Config, use_test: bool) -> DataSplits:
    """The run's splits, normalised; augmentation sizes checked against the images."""
    splits = load_dataset(
        cfg.dataset, cfg.data_dir, download=cfg.download, val_fraction=cfg.val_fraction,
        subset=cfg.subset, seed=cfg.data_seed, image_size=cfg.image_size, with_test=use_test,
        **cfg.dataset_options,
    )
    splits = apply_normalize(splits, cfg.normalize)
    info = splits.info
    for key, value in (("augment.cutout", cfg.augment.cutout), ("augment.crop_padding", cfg.augment.crop_padding)):
        if value > info.image_size:
            raise ConfigError(f"{key}={value} is larger than the {info.image_size}x{info.image_size} images of "
                              f"{cfg.dataset}; accepted 0..{info.image_size}")
    return splits


def build_run(cfg: Config, device: torch.device, dist_info: D.DistInfo, ckpt: dict[str, Any] | None,
              use_test: bool = True) -> Run:
    """Seed, load the data, build the method (``ckpt``: a resumed run's checkpoint, whose teacher record and
    weights it takes instead of ``cfg.weights``), its loaders, optimizer, schedule and precision."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    needs_indices = METHODS.get(cfg.method).needs_indices  # MixUp/CutMix were refused with it by the config
    seed_everything(cfg.seed)  # the same seed on every rank: identical initial weights
    splits = load_data(cfg, use_test)
    info = splits.info
    fingerprint = data_fingerprint(splits)
    try:
        method = build_method(cfg, info, device, teacher_meta=(ckpt or {}).get("teacher"), load_weights=ckpt is None,
                              train_labels=splits.train.labels if needs_indices else None)
    except WeightsError as e:
        raise ConfigError(f"weights: {e}") from None
    if cfg.sync_bn and dist_info.enabled:
        method = D.convert_sync_batchnorm(method, device)
    if cfg.channels_last:
        method = method.to(memory_format=torch.channels_last)
    deploy_name = getattr(method, "deploy_model_name", cfg.model)
    if dist_info.is_main:
        warn_small_stride(method.deploy_model(), deploy_name, info.image_size)

    aug = cfg.augment
    train_loader = make_loader(
        splits.train, info, batch_size=cfg.batch_size, train=True, device=device,
        crop_padding=aug.crop_padding, padding_mode=aug.padding_mode, flip=aug.flip, cutout=aug.cutout,
        mixup=aug.mixup, cutmix=aug.cutmix, mix_prob=aug.mix_prob, randaugment=aug.randaugment,
        randaugment_magnitude=aug.randaugment_magnitude, num_classes=len(info.classes),
        seed=cfg.seed, channels_last=cfg.channels_last, rank=dist_info.rank, world_size=dist_info.world_size,
        with_indices=needs_indices,  # batches (images, labels, dataset indices) for a per-sample state
    )
    eval_kw = dict(batch_size=cfg.eval_batch_size, train=False, device=device, channels_last=cfg.channels_last,
                   rank=dist_info.rank, world_size=dist_info.world_size)
    val_loader = make_loader(splits.val, info, **eval_kw) if splits.val is not None and len(splits.val) else None
    test_loader = make_loader(splits.test, info, **eval_kw) if use_test else None
    if len(train_loader) == 0:
        raise ConfigError(
            f"batch_size={cfg.batch_size} is larger than the {len(splits.train)} training images "
            "(drop_last leaves no batch); lower batch_size or raise subset"
        )

    lr = cfg.lr * (dist_info.world_size if cfg.lr_scale == "linear" else 1)
    optimizer = build_optimizer(method.param_groups(cfg.weight_decay), cfg, lr)
    scheduler = build_scheduler(optimizer, cfg, len(train_loader))
    data_sizes = {"train": len(splits.train), "val": len(splits.val) if splits.val is not None else 0,
                  "test": len(splits.test)}
    return Run(splits=splits, info=info, fingerprint=fingerprint, method=method, deploy_name=deploy_name,
               train_loader=train_loader, val_loader=val_loader, test_loader=test_loader, optimizer=optimizer,
               scheduler=scheduler, precision=Precision(device, cfg.precision, cfg.grad_clip), lr=lr,
               data_sizes=data_sizes)


def parameter_counts(method: Method) -> dict[str, int]:
    return {"deploy": count_parameters(method.deploy_model()), "extra": int(method.extra_parameters()),
            "total": count_parameters(method)}


def log_run_start(run: Run, cfg: Config, device: torch.device, dist_info: D.DistInfo,
                  params: dict[str, int]) -> None:
    """The line that names what trains, on what, where."""
    log.info("%s on %s: %s, %s deploy params, %s extra; data %s; device %s, %s, %d threads%s",
             cfg.method, cfg.dataset, cfg.model, f"{params['deploy']:,}", f"{params['extra']:,}", run.data_sizes,
             device, cfg.precision, torch.get_num_threads(),
             f"; rank {dist_info.rank} of {dist_info.world_size}, global batch "
             f"{cfg.batch_size * dist_info.world_size}, lr {run.lr:g}" if dist_info.enabled else "")
