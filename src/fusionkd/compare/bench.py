"""``fusionkd bench``: training throughput (img/s) and peak memory of each method × model on this device.

How it measures, per (method, model), in a **fresh Python process** (so that one measurement's memory and
caches never leak into the next):

1. build the method exactly as the engine does (:func:`fusionkd.engine.trainer.build_method`) for data of
   the dataset's shape (or ``--shape C,H,W``), with the engine's optimizer, autocast precision,
   channels-last layout and ``torch.compile`` settings; offline methods get a teacher of ``teacher_model``
   with **random weights** (its cost, not its accuracy, matters here);
2. call ``on_epoch_start`` with the middle epoch of a 10-epoch run, so methods with a first stage (MFKD's
   fusion stage) are measured in their main stage;
3. run ``warmup`` training steps (forward, backward, optimizer step) on one fixed random batch, then
   ``repeats`` timed blocks of ``steps`` steps; img/s = batch × steps / **median** block time;
4. peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak resident set size reached
   while building the method and training, minus the resident size just before building (weights,
   gradients, optimizer state, activations and allocator caches). On Linux the kernel's high-water mark is
   reset first (``/proc/self/clear_refs``) and read from ``VmHWM``, so import-time peaks do not count;
   elsewhere it is the growth of ``resource.getrusage(RUSAGE_SELF).ru_maxrss``.

``baseline`` is always measured, so each method's cost is also given as a ratio to it (time per image).
The data-pipeline benchmark (``benchmarks/data_pipeline.py``) runs with ``fusionkd bench --data``.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..engine.config import ConfigError, deep_merge
from ..methods import METHODS

log = logging.getLogger("fusionkd")

MEMORY_HOW = {
    "cuda": "torch.cuda.max_memory_allocated while building and training",
    "linux": "peak RSS while building and training (VmHWM after resetting it) minus the RSS before, in a "
             "fresh process per method and model",
    "other": "growth of the process's peak RSS (ru_maxrss) from after imports to after the timed steps, in a "
             "fresh process per method and model",
}


@dataclass
class BenchSpec:
    """What ``fusionkd bench`` measures."""

    methods: list[str]
    models: list[str]
    dataset: str = "fashion-mnist"
    shape: tuple[int, int, int] | None = None  #: (C, H, W); default: the dataset's native shape
    num_classes: int | None = None  #: default: the dataset's
    batch_size: int = 128
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    threads: int = 1
    device: str = "auto"
    warmup: int = 5
    repeats: int = 5
    steps: int = 10
    teacher_model: str = "resnet56"
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: config options of every measured run (``fusionkd bench lr=0.1 ...``); a method's own options win
    common: dict[str, Any] = field(default_factory=dict)

    def data_shape(self) -> tuple[tuple[int, int, int], int]:
        """``((C, H, W), num_classes)`` from ``shape``/``num_classes`` or the dataset registry."""
        from ..data import DATASETS
        from ..registry import UnknownNameError

        try:
            extras = DATASETS.entry(self.dataset).extras
        except UnknownNameError as e:
            raise ConfigError(f"--dataset: {e}") from None
        c, s, k = extras.get("in_chans"), extras.get("image_size"), extras.get("num_classes")
        shape = self.shape or ((c, s, s) if c and s else None)
        classes = self.num_classes or k
        if shape is None or classes is None:
            raise ConfigError(f"dataset {self.dataset!r} has no fixed shape or class count: give "
                              "--shape C,H,W and --num-classes N")
        if len(shape) != 3 or min(shape) < 1 or shape[1] != shape[2]:
            raise ConfigError(f"--shape must be C,H,W with H == W, got {','.join(map(str, shape))}")
        return (int(shape[0]), int(shape[1]), int(shape[2])), int(classes)


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise ConfigError(f"--shape {text!r}: expected C,H,W such as 3,32,32")
    return parts  # type: ignore[return-value]


# ---------------------------------------------------------------------- inside the fresh process
def _status_mb(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process in MiB (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _start_memory_window() -> tuple[str, float]:
    """Begin a peak-memory measurement: ``(how, baseline MiB)``."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        rss = _status_mb("VmRSS")
        if rss is not None:
            return "linux", rss
    except OSError:
        pass
    return "other", _peak_rss_mb()


def _peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def check_common(spec: BenchSpec) -> None:
    """Refuse bad config options before any process starts, with the config's own messages (unknown keys
    with did-you-mean, ranges, types), as ``train`` would."""
    from ..engine.config import resolve_config

    taken = {"method", "model", "dataset", "batch_size", "precision", "channels_last", "compile", "device",
             "threads", "teacher", "teacher_model"}
    clash = sorted(k for k in spec.common if k in taken)
    if clash:
        raise ConfigError(f"{', '.join(clash)}: set by bench's own flags (--methods, --models, --dataset, "
                          "--batch-size, --precision, --channels-last, --compile, --device, --threads, "
                          "--teacher-model); give them there")
    for method in spec.methods or ["baseline"]:
        layer = {"method": method, "model": spec.models[0], "dataset": spec.dataset}
        if METHODS.get(method).needs_teacher:
            layer["teacher"] = f"random-init {spec.teacher_model}"
        resolve_config(layer, deep_merge(spec.common, dict(spec.method_options.get(method) or {})))


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Measure one method × model (called in a fresh process by ``python -m fusionkd.compare._worker``)."""
    import torch

    from ..data import DatasetInfo
    from ..engine.config import resolve_config
    from ..engine.optim import build_optimizer
    from ..engine.trainer import autocast_context, build_method, compile_networks, hardware_info

    torch.set_num_threads(int(job["threads"]))
    c, h, w = job["shape"]
    needs_teacher = METHODS.get(job["method"]).needs_teacher
    layer = {"method": job["method"], "model": job["model"], "dataset": job["dataset"], "epochs": 10,
             "batch_size": job["batch_size"], "precision": job["precision"],
             "channels_last": job["channels_last"], "compile": job["compile"], "device": job["device"],
             "threads": job["threads"]}
    if needs_teacher:
        layer["teacher"] = f"random-init {job['teacher_model']}"  # never loaded: teacher_meta below builds it
    cfg = resolve_config(layer, job.get("overrides") or {})
    from ..engine.config import resolve_device

    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    how, mem0 = _start_memory_window()
    info = DatasetInfo(name=job["dataset"], classes=[f"class_{i}" for i in range(job["num_classes"])],
                       mean=(0.0,) * c, std=(1.0,) * c, in_chans=c, image_size=h)
    teacher_meta = {"model": job["teacher_model"], "model_kwargs": {}, "path": "random weights (bench)"} \
        if needs_teacher else None
    method = build_method(cfg, info, device, teacher_meta=teacher_meta)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    method = method.to(memory_format=fmt)
    if cfg.compile:
        compile_networks(method)
    optimizer = build_optimizer(method.param_groups(cfg.weight_decay), cfg, cfg.lr)
    amp = autocast_context(device, cfg.precision)
    g = torch.Generator().manual_seed(0)
    images = torch.randn((cfg.batch_size, c, h, w), generator=g).to(device).contiguous(memory_format=fmt)
    labels = torch.randint(0, job["num_classes"], (cfg.batch_size,), generator=g).to(device)
    epoch = cfg.epochs // 2
    method.on_epoch_start(epoch)
    method.train()

    def step() -> torch.Tensor:
        with amp:
            terms = method.training_step(images, labels, epoch)
        loss = sum(v.float() for v in terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(job["warmup"]):
        step()
    sync()
    times = []
    loss = None
    for _ in range(job["repeats"]):
        t0 = time.perf_counter()
        for _ in range(job["steps"]):
            loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    if device.type == "cuda":
        how, peak = "cuda", torch.cuda.max_memory_allocated(device) / 2**20
    elif how == "linux":
        peak = (_status_mb("VmHWM") or mem0) - mem0
    else:
        peak = _peak_rss_mb() - mem0
    return {
        "method": job["method"], "model": job["model"], "family": METHODS.get(job["method"]).family,
        "img_per_s": cfg.batch_size * job["steps"] / median, "step_ms_median": 1000 * median / job["steps"],
        "step_ms_min": 1000 * min(times) / job["steps"], "peak_memory_mb": peak,
        "memory_measure": MEMORY_HOW[how],
        "loss_finite": bool(loss is not None and torch.isfinite(loss).item()),
        "params_total": sum(p.numel() for p in {id(p): p for p in method.parameters()}.values()),
        "hardware": hardware_info(device),
    }


# ---------------------------------------------------------------------- the driver
def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(job["threads"])
    proc = subprocess.run([sys.executable, "-m", "fusionkd.compare._worker", "bench", json.dumps(job)],
                          capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        return {"method": job["method"], "model": job["model"],
                "error": f"exit code {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def bench(spec: BenchSpec, report: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every method × model (``baseline`` first) and return ``{"settings", "results"}``; each
    result has ``img_per_s``, ``time_ratio`` (baseline img/s ÷ method img/s: > 1 = costlier) and
    ``peak_memory_mb``."""
    say = report or log.info
    for m in spec.methods:
        METHODS.entry(m)  # raises UnknownNameError listing the accepted names
    methods = ["baseline"] + [m for m in spec.methods if m != "baseline"]
    (c, h, w), classes = spec.data_shape()
    if spec.threads < 1 or spec.batch_size < 1 or spec.repeats < 1 or spec.steps < 1 or spec.warmup < 0:
        raise ConfigError("--threads, --batch-size, --repeats and --steps must be >= 1 and --warmup >= 0")
    check_common(spec)
    results = []
    for model in spec.models:
        base = None
        for method in methods:
            job = {"method": method, "model": model, "dataset": spec.dataset, "shape": [c, h, w],
                   "num_classes": classes, "batch_size": spec.batch_size, "precision": spec.precision,
                   "channels_last": spec.channels_last, "compile": spec.compile, "threads": spec.threads,
                   "device": spec.device, "warmup": spec.warmup, "repeats": spec.repeats, "steps": spec.steps,
                   "teacher_model": spec.teacher_model,
                   "overrides": deep_merge(spec.common, dict(spec.method_options.get(method) or {}))}
            say(f"bench {method} {model} ...")
            r = _run_job(job)
            if "error" not in r:
                if method == "baseline":
                    base = r["img_per_s"]
                r["time_ratio"] = base / r["img_per_s"] if base else None
            results.append(r)
            say(format_row(r))
    return {"settings": {k: v for k, v in asdict(spec).items() if k != "method_options"} | {
        "shape": [c, h, w], "num_classes": classes, "method_options": spec.method_options},
        "results": results}


def format_row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['method']:<12} {r['model']:<12} FAILED: {r['error']}"
    ratio = "-" if r.get("time_ratio") is None else f"{r['time_ratio']:.2f}x"
    return (f"{r['method']:<12} {r['model']:<12} {r['img_per_s']:>10,.0f} {ratio:>10} "
            f"{r['peak_memory_mb']:>10,.0f} {r['step_ms_median']:>10.1f}")


def format_table(out: dict[str, Any]) -> str:
    """The printed table: method, model, img/s, time ratio to baseline, peak memory, median step time."""
    s = out["settings"]
    head = f"{'method':<12} {'model':<12} {'img/s':>10} {'x baseline':>10} {'peak MB':>10} {'step ms':>10}"
    rows = [format_row(r) for r in out["results"]]
    hw = next((r["hardware"] for r in out["results"] if "hardware" in r), {})
    mem = next((r["memory_measure"] for r in out["results"] if "memory_measure" in r), "")
    return "\n".join([
        f"training throughput, batch {s['batch_size']} of {'x'.join(map(str, s['shape']))}, "
        f"{s['precision']}, channels_last={s['channels_last']}, compile={s['compile']}, "
        f"{s['threads']} thread(s), device {hw.get('device', s['device'])} "
        f"({hw.get('gpu') or hw.get('cpu', '?')}); median of {s['repeats']} x {s['steps']} steps after "
        f"{s['warmup']} warm-up steps",
        head, *rows,
        "x baseline = time per image relative to baseline (baseline img/s / method img/s); "
        f"peak MB = {mem}; offline methods use a randomly initialised {s['teacher_model']} teacher",
    ])


def data_benchmark_script() -> Path:
    """``benchmarks/data_pipeline.py`` of the source checkout (or of the current folder)."""
    for root in (Path(__file__).resolve().parents[3], Path.cwd()):
        p = root / "benchmarks" / "data_pipeline.py"
        if p.is_file():
            return p
    raise FileNotFoundError("benchmarks/data_pipeline.py was not found (it lives in the fusionkd source "
                            "checkout; run from there)")


def run_data_benchmark(args: Sequence[str]) -> int:
    """Run the data-pipeline benchmark with ``args``; returns its exit code."""
    return subprocess.call([sys.executable, str(data_benchmark_script()), *args])
