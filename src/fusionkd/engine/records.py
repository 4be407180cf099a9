"""What a run records: the contents of a checkpoint, its identity (config hash), the per-epoch lines of
``metrics.jsonl`` and ``train.log``, the best epoch's test accuracy in ``best.pt``, and ``summary.json``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..data import DatasetInfo
from ..methods import METHODS, Method
from ..version import __version__
from .checkpoint import FORMAT, VERSION, atomic_save, atomic_write_text, read_checkpoint_file, rng_state, storage_error
from .config import Config
from .distributed import DistInfo, group_record
from .hardware import hardware_info

#: options that may differ when a run is resumed (everything else must match the checkpoint)
RESUME_MUTABLE = {"epochs", "progress", "log_every", "threads", "eval_batch_size", "tensorboard", "device",
                  "eval_test", "tracker", "tracker_uri", "tracker_experiment"}


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


def run_record(cfg: Config, info: DatasetInfo, data_sizes: dict[str, int], deploy_name: str,
               method: Method) -> dict[str, Any]:
    """What every checkpoint of this invocation shares: config, its hash, data, deploy name, teacher."""
    t = method.ctx.teacher
    return {"config": cfg.to_dict(), "config_hash": config_hash(cfg),
            "data": {**info.to_dict(), "sizes": data_sizes},
            "deploy_name": deploy_name, "teacher": dict(t.meta) if t is not None else None}


def checkpoint_state(method: Method, optimizer, scheduler, scaler_state: dict[str, Any] | None, epoch: int,
                     metrics: dict[str, Any], best: dict[str, Any] | None, common: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint after ``epoch`` finished epochs: everything needed to resume exactly."""
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
        "scaler": scaler_state,
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


def save_epoch(run_dir: Path, state: dict[str, Any], best: dict[str, Any] | None, final: bool) -> None:
    """``last.pt``, then ``best.pt`` when this epoch is the best (or, at the end, the best epoch's test
    accuracy into the older ``best.pt``)."""
    atomic_save(state, run_dir / "last.pt")
    if best is not None and best["epoch"] == state["epoch"]:
        atomic_save(state, run_dir / "best.pt")
    elif final and best is not None:
        record_best_test(run_dir, best)


def record_best_test(run_dir: Path, best: dict[str, Any]) -> None:
    """Write the best epoch's test accuracy into ``best.pt`` (after ``last.pt`` holds it too)."""
    path = run_dir / "best.pt"
    ckpt = read_checkpoint_file(path)
    if ckpt.get("epoch") != best["epoch"]:
        return
    ckpt["best"] = best
    ckpt["metrics"] = {**(ckpt.get("metrics") or {}), "test": best["test"]}
    atomic_save(ckpt, path)


def append_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
            f.flush()
    except OSError as e:
        raise storage_error(path, e) from e


def truncate_metrics(run_dir: Path, epochs_done: int) -> None:
    """Drop the lines of epochs after ``epochs_done`` (and a line torn by a stop) from ``metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
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


def epoch_line(m: dict[str, Any], head: str) -> str:
    """The epoch's line in the log: loss, lr, speed, time, every head's validation (and test) accuracy."""
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


def run_summary(cfg: Config, run_dir: Path, method: Method, best, last: dict[str, Any], params,
                data_sizes, info: DatasetInfo, device: torch.device, fingerprint: str | None,
                dist_info: DistInfo | None = None) -> dict[str, Any]:
    """``summary.json``: best (by validation) and last epoch accuracies, time, throughput, parameters, and
    what the run ran on (``hardware``, with ``distributed``: the process group's world size and backend, or
    None for one plain process)."""
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    train_time = sum(m["time_train_s"] for m in lines)
    eval_time = sum(m.get("time_eval_s", 0.0) for m in lines)
    seen = sum(m["img_per_s"] * m["time_train_s"] for m in lines)
    return {
        "finished": True,
        "method": cfg.method,
        "family": METHODS.get(cfg.method).family,
        "model": cfg.model,
        "models": cfg.models,
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "run_dir": str(run_dir),
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
                 "fingerprint": fingerprint},
        "hardware": {**hardware_info(device), "distributed": group_record(dist_info or DistInfo())},
        "method_extras": method.summary_extras(),
    }
