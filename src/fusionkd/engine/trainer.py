"""The training engine: one loop for every method.

It owns everything a method must not: devices, precision, ``torch.compile``, the optimizer and schedule,
evaluation of every head, checkpoints (atomic), exact resume, the NaN guard, logging and the run folder.

Run folder layout (``out_dir/name``)::

    config.yaml      the fully resolved config
    metrics.jsonl    one JSON line per epoch: loss terms, every head's val/test accuracy, lr, time, img/s
    train.log        the log of every invocation (appended on resume)
    last.pt          checkpoint after the last finished epoch (everything needed to resume exactly)
    best.pt          checkpoint of the epoch with the best validation accuracy of the deploy head
    summary.json     best (by validation) and last epoch accuracies, time, throughput, parameters
    tb/              TensorBoard events (tracker=tensorboard or tensorboard=true)
    mlflow_run.json  the MLflow run this folder logs to (tracker=mlflow)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import DataFormatError, DatasetInfo, DatasetNotFoundError, DataSplits, DeviceLoader, load_dataset
from ..data.store_loader import make_loader
from ..errors import NonFiniteLossError
from ..methods import METHODS, Method, MethodContext, Teacher, count_parameters
from ..models import WeightsError
from ..version import __version__
from . import distributed as D
from .checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    StorageError,
    atomic_copy,
    atomic_save,
    atomic_write_text,
    best_is_last,
    build_deploy_model,
    load_checkpoint,
    load_weights_strict,
    read_checkpoint_file,
    rng_state,
    set_rng_state,
    storage_error,
)
from .config import Config, ConfigError, build_options
from .normalize import apply_normalize
from .optim import build_optimizer, build_scheduler
from .progress import Progress
from .rundir import (
    RunLock,
    RunLockedError,
    claim_problem,
    clear_folder,
    folder_entries,
    has_finished_epoch,
    is_marked,
    mark,
    remove_stale_temps,
)
from .trackers import Callback, build_trackers

log = logging.getLogger("fusionkd")

#: options that may differ when a run is resumed (everything else must match the checkpoint)
RESUME_MUTABLE = {"epochs", "progress", "log_every", "threads", "eval_batch_size", "tensorboard", "device",
                  "eval_test", "tracker", "tracker_uri", "tracker_experiment"}


@dataclass
class RunResult:
    """What ``fusionkd.train`` returns: the run folder and its summary."""

    run_dir: Path
    summary: dict[str, Any]
    config: Config

    @property
    def deploy_head(self) -> str:
        return self.summary["deploy_head"]

    @property
    def best_test_accuracy(self) -> float:
        """Test accuracy (%) of the deploy head at the epoch of best validation accuracy."""
        return self.summary["best"]["test"][self.deploy_head]

    @property
    def last_test_accuracy(self) -> float:
        """Test accuracy (%) of the deploy head after the last epoch."""
        return self.summary["last"]["test"][self.deploy_head]

    def load_deploy_model(self, which: str = "best") -> nn.Module:
        """The deployed network (``which`` = "best" or "last"), rebuilt from the checkpoint."""
        return build_deploy_model(load_checkpoint(self.run_dir / f"{which}.pt"))


# ---------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what :mod:`platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where it cannot be read)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def cpu_bf16_support(flags: set[str] | None = None) -> str:
    """What the CPU offers bf16 matmuls/convolutions: "amx" (AMX-BF16 tiles), "avx512_bf16" (AVX-512-BF16
    dot products) or "none" (bf16 is then emulated). Recorded with every run; whether bf16 is *faster* also
    depends on oneDNN's kernels for the shapes at hand, so ``fusionkd demo --precision auto`` measures it."""
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "amx"
    return "avx512_bf16" if "avx512_bf16" in flags else "none"


def hardware_info(device: torch.device) -> dict[str, Any]:
    flags = cpu_flags()
    info = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "device": str(device),
            "torch": str(torch.__version__), "python": platform.python_version(), "fusionkd": __version__,
            "cpu_bf16": cpu_bf16_support(flags)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


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


def _teacher_from_meta(meta: dict[str, Any], info: DatasetInfo, device: torch.device) -> Teacher:
    """A teacher network of the recorded architecture, weights to be filled by ``method_state``."""
    from ..models import create_model

    model = create_model(meta["model"], num_classes=len(info.classes), in_chans=info.in_chans,
                         **dict(meta.get("model_kwargs") or {})).to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model=model, model_name=meta["model"], meta=dict(meta))


def build_method(cfg: Config, info: DatasetInfo, device: torch.device,
                 teacher_meta: dict[str, Any] | None = None, load_weights: bool = False) -> Method:
    """Construct the configured method for data ``info`` (loading the teacher when it needs one).

    ``load_weights``: initialise the networks from ``cfg.weights`` (a new run; a resumed or evaluated one
    gets its weights from the checkpoint)."""
    method_cls = METHODS.get(cfg.method)
    options = build_options(method_cls, cfg.options, cfg.method)
    teacher = None
    if method_cls.needs_teacher:
        if teacher_meta is not None:
            teacher = _teacher_from_meta(teacher_meta, info, device)
        elif cfg.teacher_model:
            from .teachers import load_outside_teacher

            teacher = load_outside_teacher(cfg, info, device)
        else:
            teacher = load_teacher(cfg.teacher, info, device, cfg)
    ctx = MethodContext(
        model=cfg.model, models=list(cfg.models or []), num_classes=len(info.classes), in_chans=info.in_chans,
        image_size=info.image_size, epochs=cfg.epochs, teacher=teacher,
        weights=cfg.weights if load_weights else None,
    )
    method = method_cls(ctx, options)
    return method.to(device)


#: from this input size on, a network that reduces the image only 4-8x (a CIFAR stem) gets a warning
LARGE_INPUT = 128


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


@torch.inference_mode()
def evaluate(method: Method, loader: DeviceLoader, amp, dist_info: D.DistInfo | None = None,
             on_batch: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Top-1 accuracy (%) of every head; counts stay on the device until the end (one sync). Under
    torchrun each rank evaluates its shard and the counts are summed, so every rank gets the same numbers.
    ``on_batch(images_done, images_total)`` is called after every batch (host-side counts, no sync)."""
    method.eval()
    correct: dict[str, torch.Tensor] = {}
    total = 0
    n_all = int(getattr(loader, "num_samples", 0))  # this rank's images (both loaders serve every one in eval)
    for images, labels in loader:
        with amp:
            heads = method.eval_logits(images)
        for name, logits in heads.items():
            hit = (logits.argmax(dim=1) == labels).sum()
            correct[name] = correct[name] + hit if name in correct else hit
        total += labels.numel()
        if on_batch is not None:
            on_batch(total, max(n_all, total))
    names = sorted(correct)
    device = next(iter(correct.values())).device if correct else torch.device("cpu")
    counts = torch.stack([correct[n] for n in names] + [torch.tensor(total, device=device)]).to(torch.float64)
    if dist_info is not None:
        D.all_reduce_sum(counts, dist_info)
    counts = counts.tolist()
    return {n: 100.0 * c / max(counts[-1], 1) for n, c in zip(names, counts[:-1])}


def _end_callbacks(callbacks: list[Callback], summary: dict[str, Any] | None, run_dir: Path,
                   error: BaseException | None) -> None:
    """``on_run_end`` of every callback; a failing one is logged, never allowed to hide the run's outcome."""
    for cb in callbacks:
        try:
            cb.on_run_end(summary, run_dir, error)
        except Exception as e:  # noqa: BLE001
            log.warning("%s.on_run_end failed: %s: %s", type(cb).__name__, type(e).__name__, e)


# ---------------------------------------------------------------------- the run
def _read_config_yaml(run_dir: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{run_dir / 'config.yaml'} cannot be read ({e}); restore it or start the run again "
                              "with --overwrite") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{run_dir / 'config.yaml'} does not hold a mapping of options")
    return data


def _read_epoch(path: Path) -> int | None:
    """The ``epoch`` of a checkpoint file, read without building anything (memory-mapped)."""
    return read_checkpoint_file(path).get("epoch")


def config_hash(cfg: Config | dict[str, Any]) -> str:
    """sha256 of the settings that define a run (everything but :data:`RESUME_MUTABLE`): the identity a
    checkpoint carries, so that resume can tell a folder's own ``last.pt`` from another run's."""
    d = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    key = {k: v for k, v in d.items() if k not in RESUME_MUTABLE}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """``key: a vs b`` for every defining setting that differs between two config dicts."""
    keys = sorted((set(a) | set(b)) - RESUME_MUTABLE)
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


#: errors that mean "this input cannot run": a folder made by this invocation is removed again
REFUSALS = (ConfigError, CheckpointError, DatasetNotFoundError, DataFormatError, ValueError, ImportError)


def data_fingerprint(splits: DataSplits) -> str:
    """A cheap content fingerprint of the data a run read: classes, normalisation, split sizes and the label
    counts of every split (no pass over the pixels). ``fusionkd report`` keeps runs whose fingerprints differ
    in separate rows even when their dataset name is the same (two image folders, two subsets)."""
    import hashlib

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


class Trainer:
    """Trains one configured run; ``Trainer(cfg).fit()`` or ``Trainer.resume(run_dir).fit()``.

    The run folder is locked (:class:`~fusionkd.engine.rundir.RunLock`) for the whole of :meth:`fit`; see
    docs/engine.md for what a stop at any moment can lose (at most the epoch in progress).
    """

    def __init__(self, cfg: Config, run_dir: Path | None = None, *, overwrite: bool = False,
                 _resume_ckpt: dict[str, Any] | None = None, _resuming: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else cfg.run_dir
        self.resume_ckpt = _resume_ckpt
        self.resuming = _resuming or _resume_ckpt is not None
        self.overwrite = overwrite
        #: train at most this many epochs in this invocation, then stop (resumable, no summary yet)
        self.stop_after: int | None = None
        #: the trained method after ``fit()`` (for tests and programmatic use)
        self.method: Method | None = None
        #: the summary of a run that ``resume`` found finished already (``fit`` then trains nothing)
        self.finished_summary: dict[str, Any] | None = None
        #: where the progress display also writes its state as JSON (``fusionkd compare`` reads it)
        self.status_file: Path | None = None
        self._data_fingerprint: str | None = None
        #: extra :class:`~fusionkd.engine.trackers.Callback` objects (rank 0), after the config's trackers
        self.callbacks: list[Callback] = []
        #: False: the test split is neither loaded nor evaluated (``fusionkd tune``: choices see validation only)
        self.use_test = True
        self.dist = D.env_info()
        self._file_handler: logging.Handler | None = None
        self._lock: RunLock | None = None
        self._made_folder = False  # this invocation created (or restarted) the folder
        self._owned_before = False  # the folder was a marked fusionkd run folder before this invocation
        self._last_val: float | None = None  # deploy head's latest validation accuracy, for the progress bar
        if not self.resuming:
            self._check_teacher_file()
        if not self.resuming and not self.dist.enabled:
            self._check_fresh_dir()  # fail before any work; under torchrun rank 0 does it in fit()

    # -------------------------------------------------------------- construction
    @classmethod
    def resume(cls, run_dir: str | Path, overrides: dict[str, Any] | None = None) -> Trainer:
        """Continue the run in ``run_dir`` from its ``last.pt``, exactly where it stopped.

        Only options in ``RESUME_MUTABLE`` may change (e.g. ``epochs`` to extend a finished run). A folder
        whose run never finished an epoch (no ``last.pt``) starts again from epoch 1 with its stored
        ``config.yaml``: nothing is lost by doing so.
        """
        from .config import build_dataclass, deep_merge, nest, validate

        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise CheckpointError(f"cannot resume {str(run_dir)!r}: no such run folder")
        ckpt = None
        if (run_dir / "last.pt").is_file():
            ckpt = load_checkpoint(run_dir / "last.pt")
            base = dict(ckpt.get("config") or {})
            if not base:
                raise CheckpointError(f"{run_dir / 'last.pt'}: holds no config; it is not a training checkpoint")
        elif (run_dir / "config.yaml").is_file():
            if any((run_dir / n).is_file() for n in ("best.pt", "summary.json")):
                raise CheckpointError(
                    f"cannot resume {str(run_dir)!r}: it has best.pt/summary.json but no last.pt, so the "
                    "training state to continue from is gone; start it again with --overwrite")
            base = _read_config_yaml(run_dir)
        else:
            raise CheckpointError(f"cannot resume {str(run_dir)!r}: it has neither last.pt nor config.yaml "
                                  "(is it a fusionkd run folder?)")
        changes = nest(overrides or {})
        bad = sorted(k for k in changes if k not in RESUME_MUTABLE and changes[k] != base.get(k))
        if bad:
            raise ConfigError(
                f"cannot change {', '.join(bad)} when resuming (the checkpoint was made with other values); "
                f"options that may change on resume: {', '.join(sorted(RESUME_MUTABLE))}"
            )
        from ..plugins import importing_for

        with importing_for(f"resuming {run_dir}"):  # its plug-in files are named before their code runs
            cfg = build_dataclass(Config, deep_merge(base, changes))
            validate(cfg)
        done = int(ckpt["epoch"]) if ckpt is not None else 0
        if cfg.epochs < done:
            raise ConfigError(f"epochs={cfg.epochs} is less than the {done} epochs already trained")
        trainer = cls(cfg, run_dir, _resume_ckpt=ckpt, _resuming=True)
        if ckpt is not None and done == cfg.epochs and (run_dir / "summary.json").is_file():
            with contextlib.suppress(OSError, ValueError):
                trainer.finished_summary = json.loads((run_dir / "summary.json").read_text())
        return trainer

    def _check_teacher_file(self) -> None:
        """A ``teacher=`` / ``teacher_weights=`` file that is not there is refused before the data is loaded
        (or a store prepared), not after."""
        cfg = self.cfg
        if cfg.teacher and METHODS.get(cfg.method).needs_teacher:
            p = Path(cfg.teacher).expanduser()
            if not (p.is_file() or (p.is_dir() and any((p / n).is_file() for n in ("best.pt", "last.pt")))):
                raise ConfigError(f"teacher={cfg.teacher!r}: no such checkpoint (give a fusionkd best.pt/last.pt, "
                                  "an exported .pt, or a run folder holding one)")
        if cfg.teacher_weights and not Path(cfg.teacher_weights).expanduser().is_file():
            raise ConfigError(f"teacher_weights={cfg.teacher_weights!r}: no such file")

    def _check_fresh_dir(self) -> None:
        """Refuse early (before any data is loaded) a folder this run may not take: one that holds anything
        fusionkd did not write, one it did not make (unless empty), or finished epochs without ``overwrite``
        (:func:`~fusionkd.engine.rundir.claim_problem`)."""
        problem = claim_problem(self.run_dir, overwrite=self.overwrite)
        if problem:
            raise ConfigError(problem)

    def _open_fresh(self) -> None:
        """Holding the lock: make the folder ready for epoch 1. Only a marked fusionkd run folder is ever
        cleared, and then only of the files fusionkd writes (never a finished epoch unless ``overwrite``)."""
        d = self.run_dir
        self._owned_before = is_marked(d)
        self._check_fresh_dir()  # again, under the lock
        entries = folder_entries(d)
        if entries:  # a marked folder holding only fusionkd's files (claim_problem refused anything else)
            if not has_finished_epoch(d):
                log.info("%s holds a run that never finished an epoch (%s); starting it again from epoch 1",
                         d, ", ".join(sorted(entries)))
            clear_folder(d)
        mark(d)
        self._made_folder = True

    def _open_resume(self) -> None:
        """Holding the lock: clean what a stop left behind and check that the folder's files agree."""
        d = self.run_dir
        removed = remove_stale_temps(d)
        stored = _read_config_yaml(d) if (d / "config.yaml").is_file() else None
        if self.resume_ckpt is None:  # no finished epoch: start again from epoch 1 with the stored config
            if (d / "last.pt").is_file():
                raise ConfigError(f"{d}: a last.pt appeared while this command started (another process is "
                                  "using the folder?); run the command again")
            for name in ("metrics.jsonl", "error.log"):
                (d / name).unlink(missing_ok=True)
            log.info("%s never finished an epoch: training it from epoch 1 with its stored config.yaml", d)
        else:
            ckpt = load_checkpoint(d / "last.pt")  # again, under the lock
            if ckpt.get("epoch") != self.resume_ckpt.get("epoch"):
                raise ConfigError(f"{d}/last.pt changed while this command started (another process was "
                                  "writing it); run the command again")
            self.resume_ckpt = ckpt
            self._check_identity(ckpt, stored)
            self._repair_best(ckpt)
            self._truncate_metrics(int(ckpt["epoch"]))
        mark(d)  # a folder from before the marker: its config and checkpoint were just read as fusionkd's
        if removed:
            log.info("removed %d unfinished temporary file(s) left by an interrupted write: %s", len(removed),
                     ", ".join(removed))

    def _check_identity(self, ckpt: dict[str, Any], stored: dict[str, Any] | None) -> None:
        """``last.pt`` must belong to this folder: same method, model, dataset, seed and config hash as
        its ``config.yaml``."""
        mine = dict(ckpt.get("config") or {})
        recorded = (ckpt.get("run") or {}).get("config_hash")
        if recorded is not None and recorded != config_hash(mine):
            raise CheckpointError(f"{self.run_dir / 'last.pt'}: its config does not match its own config hash; "
                                  "the file was altered outside fusionkd")
        if stored is None:
            log.warning("%s has no config.yaml; trusting last.pt's config", self.run_dir)
            return
        diffs = config_differences(stored, mine)
        if diffs:
            named = [x for x in diffs if x.split(":", 1)[0] in ("method", "model", "dataset", "seed")]
            raise CheckpointError(
                f"{self.run_dir / 'last.pt'} does not belong to this run folder: its config differs from the "
                f"folder's config.yaml ({'; '.join((named or diffs)[:6])}). Was another run's last.pt copied in? "
                "Put the right last.pt back, or start the run again with --overwrite"
            )

    def _repair_best(self, last: dict[str, Any]) -> None:
        """Make ``best.pt`` hold the epoch that ``last.pt`` records as best. ``last.pt`` is written before
        ``best.pt``, so the only disagreement a stop can leave is a ``best.pt`` one epoch behind a ``last.pt``
        whose own epoch is the best; then ``best.pt`` is rebuilt from ``last.pt``."""
        best = last.get("best")
        path = self.run_dir / "best.pt"
        if best is None:
            return
        try:
            held = _read_epoch(path) if path.is_file() else None
        except CheckpointError:
            held = None  # unreadable: rebuilt below when possible
        if held == best["epoch"]:
            if best.get("test") is not None and best_is_last(last) is False:
                if (read_checkpoint_file(path).get("metrics") or {}).get("test") is None:
                    self._record_best_test(best)  # a stop after last.pt, before best.pt got its test accuracy
            return
        if best_is_last(last):
            atomic_copy(self.run_dir / "last.pt", path)
            log.info("best.pt held epoch %s but last.pt records epoch %s as best (a stop between the two writes): "
                     "rebuilt best.pt from last.pt", held, best["epoch"])
            return
        raise CheckpointError(
            f"{path} holds epoch {held} but last.pt records epoch {best['epoch']} as the best one; best.pt was "
            f"changed outside fusionkd and epoch {best['epoch']}'s weights are gone. Restore best.pt, or start the "
            "run again with --overwrite"
        )

    # -------------------------------------------------------------- main loop
    def fit(self) -> RunResult:
        if self.finished_summary is not None:
            log.info("%s already finished all %d epochs; nothing to train (extend it with epochs=N)",
                     self.run_dir, self.cfg.epochs)
            return RunResult(self.run_dir, self.finished_summary, self.cfg)
        self.dist, self.device = D.setup(self.cfg.device)
        started_group = self.dist.enabled
        try:
            err: tuple[str, str] | None = None
            if self.dist.is_main:
                try:
                    if not self.resuming:
                        self._check_fresh_dir()  # before the lock file is made in a folder that is not ours
                    self._lock = RunLock(self.run_dir)
                    self._open_resume() if self.resuming else self._open_fresh()
                except (ConfigError, CheckpointError, StorageError) as e:
                    if self._lock is not None:
                        # leave the folder as found: only what this lock made goes again
                        self._lock.discard(files=False, folder=False)
                        self._lock = None
                    if not self.dist.enabled:
                        raise
                    err = (type(e).__name__, str(e))
            if self.dist.enabled:
                err = D.broadcast_object(err, self.dist)
                if err:
                    kinds = {c.__name__: c for c in (RunLockedError, CheckpointError, ConfigError)}
                    raise kinds.get(err[0], ConfigError)(err[1])
            handler = None
            try:
                if self.dist.is_main:
                    try:
                        handler = logging.FileHandler(self.run_dir / "train.log")
                    except OSError as e:
                        raise storage_error(self.run_dir / "train.log", e, "open") from e
                    handler.setLevel(logging.INFO)
                    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
                    log.addHandler(handler)
                    self._file_handler = handler
                    if log.getEffectiveLevel() > logging.INFO:  # API use without logging set up: still fill train.log
                        log.setLevel(logging.INFO)
                return self._fit()
            except REFUSALS:
                if handler is not None:
                    log.removeHandler(handler)
                    handler.close()
                    handler = None
                if self._lock is not None and self._made_folder and not has_finished_epoch(self.run_dir):
                    # a refused input leaves no run folder behind; a folder that was there before and not
                    # fusionkd's (an empty one the user made) stays, and only fusionkd's files ever go
                    made = self.run_dir in self._lock.created_dirs
                    self._lock.discard(files=True, folder=made or self._owned_before)
                raise
            finally:
                if handler is not None:
                    log.removeHandler(handler)
                    handler.close()
                if self._lock is not None:
                    self._lock.release()
                    self._lock = None
        finally:
            if started_group:
                D.cleanup(self.dist)

    def _fit(self) -> RunResult:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device, dist_info, main = self.device, self.dist, self.dist.is_main
        seed_everything(cfg.seed)  # the same seed on every rank: identical initial weights

        splits: DataSplits = load_dataset(
            cfg.dataset, cfg.data_dir, download=cfg.download, val_fraction=cfg.val_fraction,
            subset=cfg.subset, seed=cfg.data_seed, image_size=cfg.image_size, with_test=self.use_test,
            **cfg.dataset_options,
        )
        splits = apply_normalize(splits, cfg.normalize)
        info = splits.info
        self._data_fingerprint = data_fingerprint(splits)
        for key, value in (("augment.cutout", cfg.augment.cutout), ("augment.crop_padding", cfg.augment.crop_padding)):
            if value > info.image_size:
                raise ConfigError(f"{key}={value} is larger than the {info.image_size}x{info.image_size} images of "
                                  f"{cfg.dataset}; accepted 0..{info.image_size}")
        ckpt = self.resume_ckpt
        teacher_meta = (ckpt or {}).get("teacher")
        try:
            method = build_method(cfg, info, device, teacher_meta=teacher_meta, load_weights=ckpt is None)
        except WeightsError as e:
            raise ConfigError(f"weights: {e}") from None
        if cfg.sync_bn and dist_info.enabled:
            method = D.convert_sync_batchnorm(method, device)
        if cfg.channels_last:
            method = method.to(memory_format=torch.channels_last)
        self.method = method
        deploy_name = getattr(method, "deploy_model_name", cfg.model)
        if main:
            warn_small_stride(method.deploy_model(), deploy_name, info.image_size)

        aug = cfg.augment
        train_loader = make_loader(
            splits.train, info, batch_size=cfg.batch_size, train=True, device=device,
            crop_padding=aug.crop_padding, padding_mode=aug.padding_mode, flip=aug.flip, cutout=aug.cutout,
            mixup=aug.mixup, cutmix=aug.cutmix, mix_prob=aug.mix_prob, randaugment=aug.randaugment,
            randaugment_magnitude=aug.randaugment_magnitude, num_classes=len(info.classes),
            seed=cfg.seed, channels_last=cfg.channels_last, rank=dist_info.rank, world_size=dist_info.world_size,
        )
        eval_kw = dict(batch_size=cfg.eval_batch_size, train=False, device=device, channels_last=cfg.channels_last,
                       rank=dist_info.rank, world_size=dist_info.world_size)
        val_loader = make_loader(splits.val, info, **eval_kw) if splits.val is not None and len(splits.val) else None
        test_loader = make_loader(splits.test, info, **eval_kw) if self.use_test else None
        if len(train_loader) == 0:
            raise ConfigError(
                f"batch_size={cfg.batch_size} is larger than the {len(splits.train)} training images "
                "(drop_last leaves no batch); lower batch_size or raise subset"
            )

        lr = cfg.lr * (dist_info.world_size if cfg.lr_scale == "linear" else 1)
        optimizer = build_optimizer(method.param_groups(cfg.weight_decay), cfg, lr)
        scheduler = build_scheduler(optimizer, cfg, len(train_loader))
        scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None

        start_epoch = 0
        best: dict[str, Any] | None = None
        if ckpt is not None:
            load_weights_strict(method, ckpt["method_state"], f"this run's {cfg.method} on {cfg.model}")
            try:
                optimizer.load_state_dict(ckpt["optimizer"])
                scheduler.load_state_dict(ckpt["scheduler"])
            except (ValueError, KeyError, TypeError, RuntimeError) as e:
                raise CheckpointError(f"{self.run_dir / 'last.pt'}: its optimizer/schedule state does not fit this "
                                      f"run ({type(e).__name__}: {e})") from e
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(ckpt["rng"])
            start_epoch = int(ckpt["epoch"])
            best = ckpt.get("best")
            if main:
                self._truncate_metrics(start_epoch)
            log.info("resumed %s at epoch %d of %d", self.run_dir, start_epoch, cfg.epochs)
        if main:  # on resume too: records an extended `epochs` (the identity check ignores such keys)
            atomic_write_text(cfg.to_yaml(), self.run_dir / "config.yaml")
        if cfg.compile:
            n = compile_networks(method)
            log.info("torch.compile: %d network parts compiled (first steps are slow while compiling)", n)

        amp = autocast_context(device, cfg.precision)
        params = {"deploy": count_parameters(method.deploy_model()), "extra": int(method.extra_parameters()),
                  "total": count_parameters(method)}
        data_sizes = {"train": len(splits.train), "val": len(splits.val) if splits.val is not None else 0,
                      "test": len(splits.test)}
        log.info("%s on %s: %s, %s deploy params, %s extra; data %s; device %s, %s, %d threads%s",
                 cfg.method, cfg.dataset, cfg.model, f"{params['deploy']:,}", f"{params['extra']:,}", data_sizes,
                 device, cfg.precision, torch.get_num_threads(),
                 f"; rank {dist_info.rank} of {dist_info.world_size}, global batch "
                 f"{cfg.batch_size * dist_info.world_size}, lr {lr:g}" if dist_info.enabled else "")
        method.warn_short_run(cfg.epochs, cfg.options, first_start=main and ckpt is None)  # once, new runs only
        if method.ctx.teacher is not None and ckpt is None:  # outside teachers and teacher=CHECKPOINT alike
            from .teachers import check_teacher

            check_teacher(method.ctx.teacher, splits, cfg, device, amp, cfg.eval_batch_size)
        elif method.ctx.teacher is not None:
            acc = method.ctx.teacher.meta.get("test_accuracy")
            log.info("teacher %s (%s), recorded test accuracy %s", method.ctx.teacher.model_name,
                     method.ctx.teacher.meta.get("path"), f"{acc:.2f}%" if acc is not None else "n/a")

        callbacks = [*build_trackers(cfg, self.run_dir), *self.callbacks] if main else []
        for cb in callbacks:
            cb.on_run_start(cfg.to_dict(), self.run_dir, start_epoch)
        progress = Progress(cfg.progress if main else "none", cfg.epochs, len(train_loader), start_epoch,
                            status_file=self.status_file if main else None)
        self._model, self._signature = method, None
        common = {"config": cfg.to_dict(), "config_hash": config_hash(cfg),
                  "data": {**info.to_dict(), "sizes": data_sizes},
                  "deploy_name": deploy_name, "teacher": self._teacher_meta(method)}
        last_metrics: dict[str, Any] = (ckpt or {}).get("metrics") or {}
        end_epoch = cfg.epochs if self.stop_after is None else min(cfg.epochs, start_epoch + self.stop_after)
        try:
            for epoch in range(start_epoch, end_epoch):
                metrics = self._train_epoch(method, optimizer, scheduler, scaler, train_loader, epoch, amp,
                                            progress, device)
                final = epoch + 1 == cfg.epochs
                if (epoch + 1) % cfg.eval_every == 0 or final:
                    t0 = time.perf_counter()
                    val = self._eval(method, val_loader, amp, progress, epoch, "val") if val_loader is not None else {}
                    metrics["val"] = val
                    # the test split: at the end, or every evaluation with eval_test=every; never when use_test
                    # is off (fusionkd tune); before on_validation, which may drop heads (mfkd)
                    if test_loader is not None and (final or cfg.eval_test == "every"):
                        metrics["test"] = self._eval(method, test_loader, amp, progress, epoch, "test")
                    method.on_validation(val)
                    self._last_val = val.get(method.deploy_head)
                    metrics["time_eval_s"] = time.perf_counter() - t0
                metrics["deploy_head"] = method.deploy_head
                best = self._update_best(best, metrics, method.deploy_head)
                if final and test_loader is not None and best is not None and best.get("test") is None:
                    t0 = time.perf_counter()
                    best = {**best, "test": self._test_best_weights(method, test_loader, amp, progress, epoch, best)}
                    metrics["time_eval_s"] = metrics.get("time_eval_s", 0.0) + time.perf_counter() - t0
                last_metrics = metrics
                if main:
                    self._append_metrics(metrics)
                    state = self._checkpoint(method, optimizer, scheduler, scaler, epoch + 1, metrics, best, common)
                    atomic_save(state, self.run_dir / "last.pt")
                    if best is not None and best["epoch"] == epoch + 1:
                        atomic_save(state, self.run_dir / "best.pt")
                    elif final and best is not None:
                        self._record_best_test(best)
                    for cb in callbacks:  # after last.pt: a callback that stops the run leaves it resumable
                        cb.on_epoch_end(metrics)
                line = self._epoch_line(metrics, method.deploy_head)
                progress.epoch_end(epoch, line, {**metrics, "val_deploy": self._last_val})
                if progress.mode != "log" and main:  # the bar / silence still leave the epoch in train.log
                    self._file_handler.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, line, None, None))
                D.barrier(dist_info)  # no rank runs ahead of the checkpoint it could resume from
        except BaseException as e:
            _end_callbacks(callbacks, None, self.run_dir, e)
            raise
        finally:
            progress.close()

        if end_epoch < cfg.epochs:
            _end_callbacks(callbacks, None, self.run_dir, None)
            log.info("stopped after epoch %d of %d as asked; continue with `fusionkd train --resume %s`",
                     end_epoch, cfg.epochs, self.run_dir)
            return RunResult(self.run_dir, {"finished": False, "epoch": end_epoch, "best": best,
                                            "deploy_head": method.deploy_head}, cfg)
        if test_loader is not None and best is not None and best.get("test") is None:  # a stop, an old run
            best = {**best, "test": self._test_best_weights(method, test_loader, amp, progress, cfg.epochs - 1, best)}
            if main:
                self._record_best_test(best)
        summary = None
        if main:
            summary = self._summary(method, best, last_metrics, params, data_sizes, info, device)
            atomic_write_text(json.dumps(summary, indent=2), self.run_dir / "summary.json")
            _end_callbacks(callbacks, summary, self.run_dir, None)
        summary = D.broadcast_object(summary, dist_info)
        return RunResult(self.run_dir, summary, cfg)

    def _train_epoch(self, method: Method, optimizer, scheduler, scaler, loader: DeviceLoader, epoch: int, amp,
                     progress: Progress, device: torch.device) -> dict[str, Any]:
        cfg = self.cfg
        method.on_epoch_start(epoch)
        method.train()
        loader.set_epoch(epoch)
        model = self._wrapped(method, device)
        sums: dict[str, torch.Tensor] = {}
        bad_step = torch.full((), -1, dtype=torch.long, device=device)
        lr0 = optimizer.param_groups[0]["lr"]
        n_seen = 0
        t0 = time.perf_counter()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        steps = 0
        for step, (images, labels) in enumerate(loader):
            with amp:
                terms = model(images, labels, epoch)  # Method.forward is training_step (DDP needs forward)
            if not terms:
                raise RuntimeError(f"method {cfg.method!r} returned no loss terms")
            loss = sum(v.float() for v in terms.values())
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
            scheduler.step()
            for k, v in terms.items():
                v = v.detach().float()
                sums[k] = sums[k] + v if k in sums else v
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step, bad_step)
            n_seen += labels.shape[0]
            steps = step + 1
            if (steps % cfg.log_every == 0) if cfg.log_every else progress.due():
                self._check_finite(bad_step, epoch)
                mean_loss = float(sum(sums.values()).item()) / steps
                progress.step(epoch, steps, mean_loss, n_seen / (time.perf_counter() - t0), self._last_val)
        self._check_finite(bad_step, epoch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        names = sorted(sums)
        means = torch.stack([sums[k] for k in names]) / max(steps, 1)
        means = (D.all_reduce_sum(means, self.dist) / self.dist.world_size).tolist()
        losses = dict(zip(names, means))
        n_seen *= self.dist.world_size
        return {
            "epoch": epoch + 1,
            "lr": lr0,
            "train": {"loss": sum(losses.values()), **losses},
            "time_train_s": elapsed,
            "img_per_s": n_seen / elapsed if elapsed > 0 else 0.0,
        }

    def _eval(self, method: Method, loader: DeviceLoader, amp, progress: Progress, epoch: int,
              split: str) -> dict[str, float]:
        return evaluate(method, loader, amp, self.dist,
                        on_batch=lambda done, total: progress.eval_step(epoch, split, done, total))

    def _test_best_weights(self, method: Method, loader: DeviceLoader, amp, progress: Progress, epoch: int,
                           best: dict[str, Any]) -> dict[str, float]:
        """Test accuracy of every head with the best-validation epoch's weights (from ``best.pt``); the
        method's current state is restored afterwards, bit for bit."""
        path = self.run_dir / "best.pt"
        ckpt = load_checkpoint(path)
        if ckpt.get("epoch") != best["epoch"]:
            raise CheckpointError(f"{path} holds epoch {ckpt.get('epoch')}, not the best epoch {best['epoch']}")
        current = {k: v.detach().clone() for k, v in method.state_dict().items()}
        load_weights_strict(method, ckpt["method_state"], f"this run's {self.cfg.method}")
        try:
            return self._eval(method, loader, amp, progress, epoch, f"test (best epoch {best['epoch']})")
        finally:
            method.load_state_dict(current)

    def _record_best_test(self, best: dict[str, Any]) -> None:
        """Write the best epoch's test accuracy into ``best.pt`` (after ``last.pt`` holds it too)."""
        path = self.run_dir / "best.pt"
        ckpt = read_checkpoint_file(path)
        if ckpt.get("epoch") != best["epoch"]:
            return
        ckpt["best"] = best
        ckpt["metrics"] = {**(ckpt.get("metrics") or {}), "test": best["test"]}
        atomic_save(ckpt, path)

    def _wrapped(self, method: Method, device: torch.device) -> nn.Module:
        """The method itself, or under torchrun one DDP wrapper around it, rebuilt whenever the set of
        trainable parameters changed (e.g. a module frozen at a stage switch)."""
        if not self.dist.enabled:
            return method
        sig = D.trainable_signature(method)
        if sig != self._signature:
            self._model, self._signature = D.wrap(method, self.dist, device), sig
        return self._model

    def _check_finite(self, bad_step: torch.Tensor, epoch: int) -> None:
        step = int(D.all_reduce_max(bad_step.clone(), self.dist).item())
        if step >= 0:
            kept = ("last.pt keeps the last good epoch" if (self.run_dir / "last.pt").exists()
                    else "no epoch finished; the same command starts the run again")
            raise NonFiniteLossError(
                f"the training loss became NaN/inf at epoch {epoch + 1}, step {step + 1}; stopping ({kept}). "
                "Try a lower lr, precision=fp32, grad_clip=..., or check the method's loss weights"
            )

    # -------------------------------------------------------------- bookkeeping
    @staticmethod
    def _update_best(best: dict[str, Any] | None, metrics: dict[str, Any], head: str) -> dict[str, Any] | None:
        """Best epoch by validation accuracy of the deploy head (never by test accuracy).

        Without a validation split the last evaluated epoch stands in (selection = "last").
        """
        if "val" not in metrics:  # not an evaluation epoch
            return best
        val = metrics.get("val") or {}
        entry = {"epoch": metrics["epoch"], "val": val, "test": metrics.get("test"),
                 "selection": "val" if head in val else "last"}
        if best is None or head not in val or val[head] > (best.get("val") or {}).get(head, -math.inf):
            return entry
        return best

    def _append_metrics(self, metrics: dict[str, Any]) -> None:
        path = self.run_dir / "metrics.jsonl"
        try:
            with open(path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
                f.flush()
        except OSError as e:
            raise storage_error(path, e) from e

    def _truncate_metrics(self, epochs_done: int) -> None:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for ln in path.read_text().splitlines():
            try:
                if ln.strip() and int(json.loads(ln)["epoch"]) <= epochs_done:
                    keep.append(ln)
            except (ValueError, KeyError, TypeError):  # a line torn by a stop in the middle of its write
                continue
        atomic_write_text("".join(ln + "\n" for ln in keep), path)

    def _teacher_meta(self, method: Method) -> dict[str, Any] | None:
        t = method.ctx.teacher
        return dict(t.meta) if t is not None else None

    def _checkpoint(self, method: Method, optimizer, scheduler, scaler, epoch: int, metrics: dict[str, Any],
                    best: dict[str, Any] | None, common: dict[str, Any]) -> dict[str, Any]:
        deploy = method.deploy_model()
        return {
            "format": FORMAT,
            "version": VERSION,
            "fusionkd_version": __version__,
            "epoch": epoch,
            "config": common["config"],
            "data": common["data"],
            "method_state": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(),
            "metrics": metrics,
            "best": best,
            "teacher": common["teacher"],
            "run": {"config_hash": common["config_hash"]},
            "deploy": {
                # read at every checkpoint: an online method may switch to a peer of another architecture
                "model": getattr(method, "deploy_model_name", common["deploy_name"]),
                "head": method.deploy_head,
                "model_kwargs": dict(getattr(method, "deploy_model_kwargs", None) or {}),
                "state_dict": {k: v.detach().clone() for k, v in deploy.state_dict().items()},
            },
        }

    @staticmethod
    def _epoch_line(m: dict[str, Any], head: str) -> str:
        parts = [f"epoch {m['epoch']}", f"loss {m['train']['loss']:.4f}", f"lr {m['lr']:.4g}",
                 f"{m['img_per_s']:,.0f} img/s", f"{m['time_train_s']:.1f}s"]
        if "time_eval_s" in m:
            parts[-1] += f" + {m['time_eval_s']:.1f}s eval"
        if "val" in m:
            val = m.get("val") or {}
            parts.append(f"val {val[head]:.2f} ({head})" if head in val else "val -")
            others = [f"{h} {a:.2f}" for h, a in val.items() if h != head]
            if others:
                parts.append("other heads val: " + ", ".join(others))
        if "test" in m:
            parts.append(f"test {m['test'][head]:.2f}")
        return " | ".join(parts)

    def _summary(self, method: Method, best, last: dict[str, Any], params, data_sizes, info: DatasetInfo,
                 device) -> dict[str, Any]:
        lines = [json.loads(ln) for ln in (self.run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        train_time = sum(m["time_train_s"] for m in lines)
        eval_time = sum(m.get("time_eval_s", 0.0) for m in lines)
        seen = sum(m["img_per_s"] * m["time_train_s"] for m in lines)
        cfg = self.cfg
        return {
            "finished": True,
            "method": cfg.method,
            "family": METHODS.get(cfg.method).family,
            "model": cfg.model,
            "models": cfg.models,
            "dataset": cfg.dataset,
            "seed": cfg.seed,
            "epochs": cfg.epochs,
            "run_dir": str(self.run_dir),
            "deploy_head": method.deploy_head,
            "deploy_model": getattr(method, "deploy_model_name", cfg.model),
            "heads": sorted((last.get("test") or last.get("val") or {}).keys()),
            "best": best,
            "last": {"epoch": last.get("epoch"), "val": last.get("val") or {}, "test": last.get("test") or {}},
            "params": params,
            "train_time_s": train_time,
            "eval_time_s": eval_time,
            "img_per_s": seen / train_time if train_time > 0 else 0.0,
            "data": {**data_sizes, "name": info.name, "subset": cfg.subset, "val_fraction": cfg.val_fraction,
                     "data_dir": str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None,
                     "fingerprint": self._data_fingerprint},
            "hardware": hardware_info(device),
            "method_extras": method.summary_extras(),
        }
