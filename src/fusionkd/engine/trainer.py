"""The training engine: one loop for every method.

It owns everything a method must not: devices, precision, ``torch.compile``, the optimizer and schedule,
evaluation of every head, checkpoints (atomic), exact resume, the NaN guard, logging and the run folder.
:meth:`Trainer.fit` reads top to bottom: claim the run folder, build the run, restore, then per epoch
train -> evaluate -> select best -> save -> callbacks. Its collaborators (docs/engine.md, "The loop"):
:mod:`.run_folder` (the folder's lifecycle), :mod:`.build` (data, method, loaders, optimizer),
:mod:`.precision`, :mod:`.evaluation`, :mod:`.records` (checkpoint contents, metrics, summary),
:mod:`.teachers` and :mod:`.hardware`.

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

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import DeviceLoader
from ..errors import NonFiniteLossError
from ..methods import Method
from . import distributed as D
from .build import (
    LARGE_INPUT,
    Run,
    build_method,
    build_run,
    compile_networks,
    data_fingerprint,
    log_run_start,
    parameter_counts,
    warn_small_stride,
)
from .checkpoint import (
    CheckpointError,
    StorageError,
    atomic_write_text,
    build_deploy_model,
    load_checkpoint,
    load_weights_strict,
    set_rng_state,
)
from .config import Config, ConfigError
from .evaluation import Evaluation, evaluate, update_best
from .hardware import cpu_bf16_support, cpu_flags, cpu_name, hardware_info, seed_everything
from .precision import autocast_context
from .progress import Progress
from .records import (
    RESUME_MUTABLE,
    append_metrics,
    checkpoint_state,
    config_differences,
    config_hash,
    epoch_line,
    record_best_test,
    run_record,
    run_summary,
    save_epoch,
    truncate_metrics,
)
from .run_folder import REFUSALS, RunFolder, finished_summary, resume_config
from .rundir import RunLockedError
from .teachers import (
    check_teacher_file,
    check_teacher_matches,
    load_teacher,
    start_teacher,
    warn_if_teacher_saw_validation,
)
from .trackers import Callback, build_trackers

#: names other modules (and older code) import from here; each lives in the collaborator named above
__all__ = [
    "LARGE_INPUT", "REFUSALS", "RESUME_MUTABLE", "NonFiniteLossError", "RunResult", "Trainer", "autocast_context",
    "build_method", "check_teacher_matches", "compile_networks", "config_differences", "config_hash",
    "cpu_bf16_support", "cpu_flags", "cpu_name", "data_fingerprint", "end_callbacks", "evaluate", "hardware_info",
    "load_teacher", "seed_everything", "update_best", "warn_if_teacher_saw_validation", "warn_small_stride",
]

log = logging.getLogger("fusionkd")


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


def end_callbacks(callbacks: list[Callback], summary: dict[str, Any] | None, run_dir: Path,
                  error: BaseException | None) -> None:
    """``on_run_end`` of every callback; a failing one is logged, never allowed to hide the run's outcome."""
    for cb in callbacks:
        try:
            cb.on_run_end(summary, run_dir, error)
        except Exception as e:  # noqa: BLE001
            log.warning("%s.on_run_end failed: %s: %s", type(cb).__name__, type(e).__name__, e)


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
        #: extra :class:`~fusionkd.engine.trackers.Callback` objects (rank 0), after the config's trackers
        self.callbacks: list[Callback] = []
        #: False: the test split is neither loaded nor evaluated (``fusionkd tune``: choices see validation only)
        self.use_test = True
        self.dist = D.env_info()
        self.folder = RunFolder(self.run_dir, overwrite)
        self._last_val: float | None = None  # deploy head's latest validation accuracy, for the progress bar
        if not self.resuming:
            check_teacher_file(cfg)
        if not self.resuming and not self.dist.enabled:
            self.folder.check_fresh()  # fail before any work; under torchrun rank 0 does it in fit()

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: dict[str, Any] | None = None) -> Trainer:
        """Continue the run in ``run_dir`` from its ``last.pt``, exactly where it stopped.

        Only options in ``RESUME_MUTABLE`` may change (e.g. ``epochs`` to extend a finished run). A folder
        whose run never finished an epoch (no ``last.pt``) starts again from epoch 1 with its stored
        ``config.yaml``: nothing is lost by doing so.
        """
        run_dir = Path(run_dir)
        cfg, ckpt = resume_config(run_dir, overrides)
        trainer = cls(cfg, run_dir, _resume_ckpt=ckpt, _resuming=True)
        trainer.finished_summary = finished_summary(run_dir, cfg, ckpt)
        return trainer

    # -------------------------------------------------------------- the run folder around the loop
    def fit(self) -> RunResult:
        if self.finished_summary is not None:
            log.info("%s already finished all %d epochs; nothing to train (extend it with epochs=N)",
                     self.run_dir, self.cfg.epochs)
            return RunResult(self.run_dir, self.finished_summary, self.cfg)
        self.dist, self.device = D.setup(self.cfg.device)
        self.folder = folder = RunFolder(self.run_dir, self.overwrite)
        started_group = self.dist.enabled
        try:
            err: tuple[str, str] | None = None
            if self.dist.is_main:
                try:
                    self.resume_ckpt = folder.claim(self.resuming, self.resume_ckpt)
                except (ConfigError, CheckpointError, StorageError) as e:
                    if not self.dist.enabled:
                        raise
                    err = (type(e).__name__, str(e))
            if self.dist.enabled:
                err = D.broadcast_object(err, self.dist)
                if err:
                    kinds = {c.__name__: c for c in (RunLockedError, CheckpointError, ConfigError)}
                    raise kinds.get(err[0], ConfigError)(err[1])
            try:
                if self.dist.is_main:
                    folder.open_log()
                result = self._fit()
                D.barrier(self.dist)  # ranks leave together: none tears the group down while another talks
                return result
            except REFUSALS:
                folder.refused()
                raise
            finally:
                folder.close()
        finally:
            if started_group:
                # the DDP wrapper's reducer holds the process group: drop it first, so the group is torn
                # down now and not by the interpreter at exit (gloo's threads then abort the process)
                self._model, self._signature = None, None
                D.cleanup(self.dist)

    # -------------------------------------------------------------- the loop
    def _fit(self) -> RunResult:
        cfg, device, main, ckpt = self.cfg, self.device, self.dist.is_main, self.resume_ckpt
        run = build_run(cfg, device, self.dist, ckpt, use_test=self.use_test)  # data, method, loaders, optimizer
        self.method = method = run.method
        start_epoch, best = self._restore(run, ckpt)
        if main:  # on resume too: records an extended `epochs` (the identity check ignores such keys)
            atomic_write_text(cfg.to_yaml(), self.run_dir / "config.yaml")
        if cfg.compile:
            n = compile_networks(method)
            log.info("torch.compile: %d network parts compiled (first steps are slow while compiling)", n)
        amp, params = run.precision.autocast, parameter_counts(method)
        log_run_start(run, cfg, device, self.dist, params)
        method.warn_short_run(cfg.epochs, cfg.options, first_start=main and ckpt is None)  # once, new runs only
        start_teacher(method.ctx.teacher, run.splits, cfg, device, amp, first_start=ckpt is None)

        callbacks = [*build_trackers(cfg, self.run_dir), *self.callbacks] if main else []
        for cb in callbacks:
            cb.on_run_start(cfg.to_dict(), self.run_dir, start_epoch)
        progress = Progress(cfg.progress if main else "none", cfg.epochs, len(run.train_loader), start_epoch,
                            status_file=self.status_file if main else None)
        evaluation = Evaluation(run.val_loader, run.test_loader, amp, self.dist, progress, self.run_dir,
                                eval_every=cfg.eval_every, eval_test=cfg.eval_test, what=cfg.method)
        self._model, self._signature = method, None
        common = run_record(cfg, run.info, run.data_sizes, run.deploy_name, method)
        last_metrics: dict[str, Any] = (ckpt or {}).get("metrics") or {}
        end_epoch = cfg.epochs if self.stop_after is None else min(cfg.epochs, start_epoch + self.stop_after)
        try:
            for epoch in range(start_epoch, end_epoch):
                final = epoch + 1 == cfg.epochs
                metrics = self._train_epoch(run, epoch, progress, device)  # train
                if evaluation.due(epoch, final):  # evaluate
                    self._last_val = evaluation.evaluate(method, epoch, metrics, final)
                best = evaluation.select_best(method, best, metrics, epoch, final)  # select best
                last_metrics = metrics
                if main:  # save (metrics line, last.pt, best.pt), then callbacks
                    self._append_metrics(metrics)
                    state = checkpoint_state(method, run.optimizer, run.scheduler, run.precision.state_dict(),
                                             epoch + 1, metrics, best, common)
                    save_epoch(self.run_dir, state, best, final)
                    for cb in callbacks:  # after last.pt: a callback that stops the run leaves it resumable
                        cb.on_epoch_end(metrics)
                line = epoch_line(metrics, method.deploy_head)
                progress.epoch_end(epoch, line, {**metrics, "val_deploy": self._last_val})
                if progress.mode != "log" and main:  # the bar / silence still leave the epoch in train.log
                    self.folder.log_line(line)
                D.barrier(self.dist)  # no rank runs ahead of the checkpoint it could resume from
        except BaseException as e:
            end_callbacks(callbacks, None, self.run_dir, e)
            raise
        finally:
            progress.close()
        return self._finish(run, evaluation, callbacks, end_epoch, best, last_metrics, params)

    def _restore(self, run: Run, ckpt: dict[str, Any] | None) -> tuple[int, dict[str, Any] | None]:
        """A resumed run's weights, optimizer, schedule, grad scaler and RNG states from ``last.pt``; returns
        the epochs done and the best-so-far record."""
        if ckpt is None:
            return 0, None
        cfg = self.cfg
        load_weights_strict(run.method, ckpt["method_state"], f"this run's {cfg.method} on {cfg.model}")
        try:
            run.optimizer.load_state_dict(ckpt["optimizer"])
            run.scheduler.load_state_dict(ckpt["scheduler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{self.run_dir / 'last.pt'}: its optimizer/schedule state does not fit this "
                                  f"run ({type(e).__name__}: {e})") from e
        run.precision.load_state_dict(ckpt.get("scaler"))
        set_rng_state(ckpt["rng"])
        start_epoch = int(ckpt["epoch"])
        if self.dist.is_main:
            truncate_metrics(self.run_dir, start_epoch)
        log.info("resumed %s at epoch %d of %d", self.run_dir, start_epoch, cfg.epochs)
        return start_epoch, ckpt.get("best")

    def _finish(self, run: Run, evaluation: Evaluation, callbacks: list[Callback], end_epoch: int,
                best: dict[str, Any] | None, last_metrics: dict[str, Any], params: dict[str, int]) -> RunResult:
        """After the loop: a resumable stop, or the best epoch's test accuracy and ``summary.json``."""
        cfg, method, main = self.cfg, run.method, self.dist.is_main
        if end_epoch < cfg.epochs:
            end_callbacks(callbacks, None, self.run_dir, None)
            log.info("stopped after epoch %d of %d as asked; continue with `fusionkd train --resume %s`",
                     end_epoch, cfg.epochs, self.run_dir)
            return RunResult(self.run_dir, {"finished": False, "epoch": end_epoch, "best": best,
                                            "deploy_head": method.deploy_head}, cfg)
        if run.test_loader is not None and best is not None and best.get("test") is None:  # a stop, an old run
            best = {**best, "test": evaluation.test_best_weights(method, cfg.epochs - 1, best)}
            if main:
                record_best_test(self.run_dir, best)
        summary = None
        if main:
            summary = run_summary(cfg, self.run_dir, method, best, last_metrics, params, run.data_sizes, run.info,
                                  self.device, run.fingerprint, self.dist)
            atomic_write_text(json.dumps(summary, indent=2), self.run_dir / "summary.json")
            end_callbacks(callbacks, summary, self.run_dir, None)
        summary = D.broadcast_object(summary, self.dist)
        return RunResult(self.run_dir, summary, cfg)

    def _train_epoch(self, run: Run, epoch: int, progress: Progress, device: torch.device) -> dict[str, Any]:
        cfg, method, optimizer = self.cfg, run.method, run.optimizer
        loader: DeviceLoader = run.train_loader
        method.on_epoch_start(epoch)
        method.train()
        loader.set_epoch(epoch)
        model = self._wrapped(method, device)
        amp = run.precision.autocast
        sums: dict[str, torch.Tensor] = {}
        bad_step = torch.full((), -1, dtype=torch.long, device=device)
        lr0 = optimizer.param_groups[0]["lr"]
        n_seen = 0
        t0 = time.perf_counter()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        steps = 0
        for step, (images, labels, *indices) in enumerate(loader):  # indices: only for a method that needs_indices
            with amp:
                terms = model(images, labels, epoch, *indices)  # Method.forward is training_step (DDP needs forward)
            if not terms:
                raise RuntimeError(f"method {cfg.method!r} returned no loss terms")
            loss = sum(v.float() for v in terms.values())
            run.precision.step(loss, optimizer, params)  # zero_grad, backward, clip, step
            run.scheduler.step()
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

    def _append_metrics(self, metrics: dict[str, Any]) -> None:
        """One line of ``metrics.jsonl`` (a method of its own: tests/fault_worker.py stops a run inside it)."""
        append_metrics(self.run_dir, metrics)
