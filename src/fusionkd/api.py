"""The Python API; the CLI (``fusionkd ...``) is a thin layer over these functions.

* :func:`train` / :func:`resume`: run training, get a :class:`~fusionkd.engine.trainer.RunResult`;
* :func:`evaluate_checkpoint`: accuracy of every head, per-class accuracy, confusion matrix;
* :func:`export_checkpoint`: the deploy network via ``torch.export`` + a plain state_dict + metadata (+ ONNX);
* :func:`predict`: class probabilities for image files;
* :func:`list_registered`: the methods, models and datasets this installation knows.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger("fusionkd")


def train(method: str | None = None, model: str | nn.Module | None = None, dataset: str | None = None, *,
          config: str | Path | None = None, overwrite: bool = False, stop_after: int | None = None,
          **overrides: Any):
    """Train a method and return its :class:`RunResult`.

    Args:
        method, model, dataset: registered names (``fusionkd list``); ``None`` keeps the default/config.
            ``model`` (and the overrides ``teacher_model`` and ``models``) may also be a network *object*:
            a zoo model, a :class:`~fusionkd.models.HookBackbone`, or a timm / torchvision-style module
            whose stages are inferred (see :func:`fusionkd.models.register_module`, which names it
            ``user-<classname>`` in the run).
        config: a YAML file of options (the same schema as the CLI's ``--config``).
        overwrite: replace an existing run folder of the same name.
        stop_after: train at most this many epochs in this call (the run stays resumable), e.g. for
            time-limited jobs.
        **overrides: any config option, nested sections as dicts or dotted names passed through
            ``**{"augment.flip": False}``; e.g. ``epochs=10, options={"peers": 3}``.

    Example::

        r = fusionkd.train(method="baseline", model="resnet20", dataset="fashion-mnist", epochs=5, subset=5000)
        r.best_test_accuracy
    """
    from .engine.config import resolve_config
    from .engine.trainer import Trainer
    from .models.adapt import register_module

    if isinstance(model, nn.Module):
        model = register_module(model)
    if isinstance(overrides.get("teacher_model"), nn.Module):
        overrides["teacher_model"] = register_module(overrides["teacher_model"])
    if isinstance(overrides.get("models"), (list, tuple)):
        overrides["models"] = [register_module(m) if isinstance(m, nn.Module) else m for m in overrides["models"]]
    top = {k: v for k, v in {"method": method, "model": model, "dataset": dataset}.items() if v is not None}
    cfg = resolve_config(top, overrides, config_file=config)
    trainer = Trainer(cfg, overwrite=overwrite)
    return _fit(trainer, stop_after)


def resume(run_dir: str | Path, stop_after: int | None = None, **overrides: Any):
    """Continue an interrupted (or extend a finished, with ``epochs=``) run from its ``last.pt``."""
    from .engine.trainer import Trainer

    return _fit(Trainer.resume(run_dir, overrides), stop_after)


def _fit(trainer, stop_after: int | None):
    trainer.stop_after = stop_after
    with _console_logging(trainer.cfg.progress != "none"):
        return trainer.fit()


class _console_logging:
    """While the API trains: when the program set up no logging at all (no handler on the root or the
    ``fusionkd`` logger), show fusionkd's INFO lines (data, model, epoch lines, the result) on stderr, as the
    CLI does. ``progress="none"`` keeps the call silent; a program that configured logging keeps its own."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.handler: logging.Handler | None = None
        self.level = log.level

    def __enter__(self) -> None:
        if self.enabled and not logging.getLogger().handlers and not log.handlers:
            import sys

            self.handler = logging.StreamHandler(sys.stderr)
            self.handler.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(self.handler)
            if log.getEffectiveLevel() > logging.INFO:
                log.setLevel(logging.INFO)

    def __exit__(self, *exc: object) -> None:
        if self.handler is not None:
            log.removeHandler(self.handler)
            log.setLevel(self.level)


def list_registered() -> dict[str, list[dict[str, str]]]:
    """``{"methods": [{name, family, description, source}], "models": [...], "datasets": [...],
    "presets": [...], "tables": [...], "plugin_errors": [...]}``;
    ``source`` is ``fusionkd``, ``entry point ...`` or ``file PATH``."""
    from .data import DATASETS
    from .methods import METHODS
    from .models import MODELS
    from .plugins import ERRORS
    from .presets import list_presets, list_tables

    src = lambda e: e.extras.get("source", "fusionkd")  # noqa: E731
    return {
        "methods": [{"name": e.name, "family": e.extras.get("family", ""), "description": e.description,
                     "source": src(e)} for e in METHODS.entries()],
        "models": [{"name": e.name, "description": e.description, "source": src(e)} for e in MODELS.entries()
                   if not e.extras.get("deploy_only")],
        "datasets": [{"name": e.name, "description": e.description, "source": src(e)} for e in DATASETS.entries()],
        "plugin_errors": [{"group": g, "name": n, "error": err} for g, n, err in ERRORS],
        "presets": list_presets(),
        "tables": list_tables(),
    }


# ---------------------------------------------------------------------- evaluation
def evaluate_checkpoint(checkpoint: str | Path, *, dataset: str | None = None, data_dir: str | None = None,
                        split: str = "test", device: str = "auto", batch_size: int = 512) -> dict[str, Any]:
    """Evaluate a checkpoint: accuracy (%) of every head, per-class accuracy and the confusion matrix
    (rows = true class, columns = predicted) of the deploy head.

    A training checkpoint (``best.pt``/``last.pt``) evaluates every head of its method; a deploy file
    from ``fusionkd export`` evaluates the deployed network.
    """
    from .data import DatasetInfo, load_dataset, make_loader
    from .engine.checkpoint import build_deploy_model, load_checkpoint, load_weights_strict
    from .engine.config import Config, ConfigError, build_dataclass, resolve_device
    from .engine.normalize import apply_normalize, normalize_of
    from .engine.trainer import build_method, check_teacher_matches

    if split not in ("test", "val"):
        raise ConfigError(f"split={split!r} is not accepted; choose test or val")
    ckpt = load_checkpoint(checkpoint)
    dev = resolve_device(device)
    cfg_d = dict(ckpt.get("config") or {})
    name = dataset or ckpt["data"]["name"]
    splits = load_dataset(name, data_dir if dataset else (data_dir or cfg_d.get("data_dir")),
                          val_fraction=cfg_d.get("val_fraction", 0.1), seed=cfg_d.get("data_seed", 0),
                          image_size=cfg_d.get("image_size"),
                          **(dict(cfg_d.get("dataset_options") or {}) if not dataset else {}))
    splits = apply_normalize(splits, normalize_of(cfg_d))
    info: DatasetInfo = splits.info
    if dataset and dataset != ckpt["data"]["name"]:
        check_teacher_matches({"data": {**ckpt["data"], "name": info.name}}, info, f"checkpoint {checkpoint}")
    elif not dataset:
        check_teacher_matches(ckpt, info, f"checkpoint {checkpoint}")
    data = splits.test if split == "test" else splits.val
    if data is None:
        raise ConfigError("split=val asked for, but the checkpoint's run had no validation split (val_fraction=0)")
    loader = make_loader(data, info, batch_size=batch_size, train=False, device=dev)

    if ckpt["format"].endswith("-deploy") or not ckpt.get("method_state"):
        net = build_deploy_model(ckpt).to(dev)
        head = ckpt["deploy"].get("head", "net")

        def heads_of(x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {head: net(x)}
    else:
        cfg: Config = build_dataclass(Config, cfg_d)
        # a method with a per-sample state (CRD's memory bank) is sized by the training split: only the size
        # matters here, the state itself comes from the checkpoint
        n_train = int(((ckpt.get("data") or {}).get("sizes") or {}).get("train") or 0)
        method = build_method(cfg, info, dev, teacher_meta=ckpt.get("teacher"),
                              train_labels=torch.arange(n_train) % max(len(info.classes), 1))
        load_weights_strict(method, ckpt["method_state"], f"a {cfg.method} on {cfg.model} (as its config says)")
        method.eval()
        head = method.deploy_head
        heads_of = method.eval_logits

    k = len(info.classes)
    confusion = torch.zeros(k, k, dtype=torch.long, device=dev)
    correct: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for x, y in loader:
            out = heads_of(x)
            for h, z in out.items():
                hit = (z.argmax(1) == y).sum()
                correct[h] = correct[h] + hit if h in correct else hit
            pred = out[head].argmax(1)
            confusion += torch.bincount(y * k + pred, minlength=k * k).view(k, k)
    n = len(data)
    conf = confusion.cpu().numpy()
    per_class = {c: float(100.0 * conf[i, i] / max(conf[i].sum(), 1)) for i, c in enumerate(info.classes)}
    return {
        "checkpoint": str(checkpoint),
        "dataset": info.name,
        "split": split,
        "images": n,
        "deploy_head": head,
        "accuracy": {h: 100.0 * float(c.item()) / n for h, c in correct.items()},
        "per_class_accuracy": per_class,
        "classes": list(info.classes),
        "confusion_matrix": conf.tolist(),
    }


# ---------------------------------------------------------------------- export
def export_checkpoint(checkpoint: str | Path, out: str | Path, *, onnx: bool = False,
                      which: str | None = None) -> dict[str, Any]:
    """Export the deploy network of ``checkpoint``.

    Writes ``out`` (a ``torch.export`` program, ``.pt2``, batch dimension dynamic), ``<out>.pt`` (a
    fusionkd deploy file: plain state_dict + metadata, usable as a teacher or for ``fusionkd eval``),
    ``<out>.json`` (metadata: model, classes, input shape, normalisation, accuracies) and, only with
    ``onnx=True`` (needs the ``onnx`` package; a clear error without it), ``<out>.onnx``. The exported
    program is loaded back and checked to give the same logits as the checkpoint's network.
    """
    from .engine.checkpoint import (
        FORMAT,
        VERSION,
        atomic_save,
        atomic_write_text,
        build_deploy_model,
        load_checkpoint,
    )
    from .engine.config import ConfigError

    del which
    if onnx and importlib.util.find_spec("onnx") is None:
        raise ConfigError("onnx=True (--onnx) needs the onnx package: pip install 'fusionkd[onnx]', or export "
                          "without it (the .pt2, .pt and .json files)")
    ckpt = load_checkpoint(checkpoint)
    model = build_deploy_model(ckpt)
    data = ckpt["data"]
    out = Path(out)
    if out.suffix != ".pt2":
        out = out.with_suffix(out.suffix + ".pt2") if out.suffix else out.with_suffix(".pt2")
    _check_export_targets(out, onnx, Path(checkpoint))
    out.parent.mkdir(parents=True, exist_ok=True)
    shape = (int(data["in_chans"]), int(data["image_size"]), int(data["image_size"]))
    example = torch.randn(2, *shape)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(out))
    reloaded = torch.export.load(str(out)).module()
    probe = torch.randn(3, *shape)
    with torch.no_grad():
        diff = float((reloaded(probe) - model(probe)).abs().max())
    metrics = ckpt.get("metrics") or {}
    meta = {
        "model": ckpt["deploy"]["model"],
        "head": ckpt["deploy"].get("head"),
        "method": (ckpt.get("config") or {}).get("method"),
        "dataset": data["name"],
        "classes": list(data["classes"]),
        "input_shape": list(shape),
        "mean": list(data["mean"]),
        "std": list(data["std"]),
        "epoch": ckpt.get("epoch"),
        "test_accuracy": (metrics.get("test") or {}).get(ckpt["deploy"].get("head")),
        "val_accuracy": (metrics.get("val") or {}).get(ckpt["deploy"].get("head")),
        "exported_max_abs_diff": diff,
        "input": "float32 (B, C, H, W), pixels scaled to [0, 1] then normalised with mean/std",
    }
    deploy_file = out.with_suffix(".pt")
    atomic_save({"format": FORMAT + "-deploy", "version": VERSION, "epoch": ckpt.get("epoch"),
                 "config": ckpt.get("config"), "data": data, "metrics": metrics, "deploy": ckpt["deploy"]},
                deploy_file)
    atomic_write_text(json.dumps(meta, indent=2), out.with_suffix(".json"))
    written = {"program": str(out), "deploy": str(deploy_file), "metadata": str(out.with_suffix(".json")),
               "max_abs_diff": diff}
    if onnx:
        onnx_path = out.with_suffix(".onnx")
        torch.onnx.export(model, (example,), str(onnx_path), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
        written["onnx"] = str(onnx_path)
    return written


# ---------------------------------------------------------------------- prediction
def _check_export_targets(out: Path, onnx: bool, source: Path) -> None:
    """Refuse to write over a file that an earlier ``fusionkd export`` did not write. The files of an export
    (``.pt2``, ``.pt``, ``.json``, ``.onnx``) may be replaced only as a set whose ``.json`` is an export's
    metadata and whose ``.pt`` (when there) is a fusionkd deploy file; anything else (a training checkpoint,
    your own weights) is named and left alone."""
    from .engine.checkpoint import FORMAT, CheckpointError, load_checkpoint
    from .engine.config import ConfigError

    targets = [out, out.with_suffix(".pt"), out.with_suffix(".json")] + ([out.with_suffix(".onnx")] if onnx else [])
    if source.is_file() and any(t.exists() and t.resolve() == source.resolve() for t in targets):
        raise ConfigError(f"--out {out}: the export would write over the checkpoint it reads ({source}); "
                          "choose another --out")
    existing = [t for t in targets if t.exists() or t.is_symlink()]
    if not existing:
        return
    ours = False
    meta = out.with_suffix(".json")
    with contextlib.suppress(OSError, ValueError):
        ours = meta.is_file() and "exported_max_abs_diff" in json.loads(meta.read_text())
    deploy = out.with_suffix(".pt")
    if ours and deploy.exists():
        try:
            ours = load_checkpoint(deploy).get("format") == FORMAT + "-deploy"
        except CheckpointError:
            ours = False
    if not ours or any(not t.is_file() or t.is_symlink() for t in existing):
        raise ConfigError(
            f"--out {out}: {', '.join(str(t) for t in existing)} already exist(s) and are not the files of an "
            "earlier fusionkd export; fusionkd does not write over files it did not make. Choose another --out, "
            "or move them away")


def load_image(path: str | Path, in_chans: int, size: int, stored_size: int | None = None) -> torch.Tensor:
    """An image file as uint8 ``(C, size, size)``, prepared as the evaluation data was: converted to grey
    (C=1) or RGB (C=3), centre-cropped to its largest square, resized to ``stored_size`` (default ``size``)
    and, when that is larger, centre-cropped to ``size``. The file goes through the checks of the image
    folders (a regular file, at most ``fusionkd.data.formats.max_image_pixels()`` pixels): see docs/data.md."""
    from PIL import Image, UnidentifiedImageError

    from .data import DataFormatError
    from .data.formats import open_image

    side = stored_size or size
    if in_chans == 3:  # exactly how image folders and stores decode their files
        from .data.formats import decode_image

        try:
            arr = decode_image(Path(path), side)
        except DataFormatError as e:
            raise ValueError(f"cannot read image {str(path)!r}: {e}") from e
        o = (side - size) // 2
        return torch.from_numpy(arr[o:o + size, o:o + size].copy()).permute(2, 0, 1).contiguous()
    try:
        with open_image(Path(path)) as im:
            im = im.convert("L" if in_chans == 1 else "RGB")
            w, h = im.size
            if w != h:
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            if im.size != (side, side):
                im = im.resize((side, side), Image.BILINEAR)
            if side > size:
                o = (side - size) // 2
                im = im.crop((o, o, o + size, o + size))
            arr = np.asarray(im, dtype=np.uint8)
    except (DataFormatError, UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {str(path)!r}: {e}") from e
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def predict(checkpoint: str | Path, images: list[str | Path], topk: int = 3) -> list[dict[str, Any]]:
    """Top-``k`` classes and probabilities of the deploy network for each image file."""
    from .engine.checkpoint import build_deploy_model, load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    model: nn.Module = build_deploy_model(ckpt)
    data = ckpt["data"]
    c, s = int(data["in_chans"]), int(data["image_size"])
    stored = data.get("stored_size")
    if stored is not None and (not isinstance(stored, int) or isinstance(stored, bool) or stored < s):
        raise ValueError(f"{checkpoint}: data.stored_size={stored!r} must be an int >= image_size ({s})")
    batch = torch.stack([load_image(p, c, s, stored) for p in images]).float().div_(255)
    mean = torch.tensor(data["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data["std"]).view(1, -1, 1, 1)
    with torch.inference_mode():
        probs = model((batch - mean) / std).softmax(1)
    k = min(topk, probs.shape[1])
    top = probs.topk(k, dim=1)
    return [
        {"image": str(p), "top": [{"class": data["classes"][int(i)], "probability": float(v)}
                                  for v, i in zip(top.values[n], top.indices[n])]}
        for n, p in enumerate(images)
    ]
