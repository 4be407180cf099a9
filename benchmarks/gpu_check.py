"""The GPU check: runs every CUDA path of fusionkd and times every method, in one command (issue #27).

A GPU is lent rarely and briefly (about 15 minutes, a machine's start included, at most 10 minutes per
command, no network). So everything is prepared here, and the run only has to be started::

    python benchmarks/gpu_check.py OUT                        # stages tests, bench, profile
    python benchmarks/gpu_check.py OUT --stages table         # the full-data Fashion-MNIST table
    python benchmarks/gpu_check.py OUT --dry-run --device cpu # the same code at tiny sizes (the test suite)

Stages (``--stages``, comma-separated, run in this order):

- ``tests``: the CUDA-marked tests (``pytest -m cuda``), output in ``tests.txt``;
- ``bench``: training img/s, step time and peak GPU memory of every method on CIFAR-100-shaped synthetic
  data held on the GPU (50,000 uint8 images of 3x32x32, fed by fusionkd's DeviceLoader with its crop and
  flip, steps exactly as the engine takes them), ResNet-32 and WRN-16-2, batch 128 and 512, in three
  settings (fp32; bf16 + channels_last; bf16 + channels_last + compile); FLOPs per training image from
  ``torch.utils.flop_counter`` and the achieved FLOP/s against the GPU's peak; evaluation img/s; FFL-S
  ResNet-32's 300-epoch CIFAR-100 recipe projected from its epoch time;
- ``profile``: ``torch.profiler`` over a few steps of the slowest fusion method, in ``profile.txt``;
- ``table``: baseline, ffl and frskd on all of Fashion-MNIST (validation carved out as in
  docs/results.md), one seed, as many epochs as fit in ``--table-minutes``, through ``fusionkd compare``.

Everything goes to OUT, flat, at most six files: ``log.txt`` (all that is printed), ``numbers.json`` (every
number), ``summary.md`` (the tables), ``tests.txt``, ``profile.txt``, ``table.md``. Each is rewritten as the
stages go, so a killed run still returns what it finished. Each stage stops at its own time budget and
says what it left out. Nothing is installed or downloaded: pytest and Pillow come from the machine, or,
where it lacks them, from ``.gpu-kit/site`` (``make gpu-kit`` prepares it, with the Fashion-MNIST files).
Run folders and scratch files go to ``--work`` (default: a fresh temporary folder), never to OUT.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / ".gpu-kit"
if (ROOT / "src" / "fusionkd").is_dir() and str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))  # run from the checkout without installing
#: what the machine itself lacks (looked up before the kit joins sys.path); the kit fills only these gaps
MISSING = [m for m in ("pytest",) if importlib.util.find_spec(m) is None]
if KIT.joinpath("site").is_dir():  # appended: the machine's own packages come first
    sys.path.append(str(KIT / "site"))

import torch  # noqa: E402

STAGES = ("tests", "bench", "profile", "table")
#: the files holding the CUDA-marked tests (tests/test_gpu_check.py checks that no other file has one): only
#: these are collected, so test modules needing optional packages the GPU machine may lack never load there
CUDA_TEST_FILES = ("tests/test_cuda.py", "tests/test_data_loader.py", "tests/test_data_large.py")
OUT_FILES = ("log.txt", "numbers.json", "summary.md", "tests.txt", "profile.txt", "table.md")
TOOL = "fusionkd benchmarks/gpu_check.py"

BENCH_METHODS = ["baseline", "kd", "fitnet", "at", "mfkd", "dml", "ffl_s", "ffl", "mfef", "byot", "frskd", "fmfsd"]
FUSION_METHODS = ["mfkd", "ffl_s", "ffl", "mfef", "frskd", "fmfsd"]
#: name -> (precision, channels_last, compile)
SETTINGS = {"fp32": ("fp32", False, False), "bf16+cl": ("bf16", True, False),
            "bf16+cl+compile": ("bf16", True, True)}

#: dense peak TFLOP/s (no sparsity) from NVIDIA's data sheets: (bf16/fp16 tensor core, tf32 tensor core).
#: fp32 convolutions run as TF32 on these GPUs by default (torch.backends.cudnn.allow_tf32 is True), so the
#: fp32 setting is compared with the TF32 peak.
GPU_PEAKS = [  # matched in order against torch.cuda.get_device_name()
    ("H200", (989.4, 494.7)),
    ("H100 PCIe", (756.0, 378.0)),
    ("H100 NVL", (835.5, 417.5)),
    ("H100", (989.4, 494.7)),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("A100", (312.0, 156.0)),
    ("L40S", (362.0, 181.0)),
    ("L4", (121.0, 60.0)),
]


# ---------------------------------------------------------------------- the output folder
class Out:
    """OUT: the log, the numbers and the Markdown summary, each rewritten atomically as results come in."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._claim()
        self.numbers: dict[str, Any] = {"tool": TOOL, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        self.sections: dict[str, str] = {}
        self.log = open(folder / "log.txt", "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run)
        self.t0 = time.perf_counter()

    def _claim(self) -> None:
        """OUT must be empty or hold only an earlier gpu_check's files (its numbers.json names the tool):
        nothing else is ever overwritten."""
        present = sorted(p.name for p in self.folder.iterdir())
        if not present:
            return
        foreign = [n for n in present if n not in OUT_FILES]
        ours = False
        with contextlib.suppress(OSError, ValueError):
            ours = json.loads((self.folder / "numbers.json").read_text()).get("tool") == TOOL
        if foreign or not ours:
            raise SystemExit(f"gpu_check: {self.folder} is not empty and not an earlier gpu_check output "
                             f"(it holds {', '.join(present[:8])}); give an empty or new folder")

    def say(self, msg: str) -> None:
        line = f"[{time.perf_counter() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def write(self, name: str, text: str) -> None:
        assert name in OUT_FILES, name
        tmp = self.folder / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.folder / name)

    def put(self, key: str, value: Any) -> None:
        self.numbers[key] = value
        self.write("numbers.json", json.dumps(self.numbers, indent=1, default=str))

    def section(self, key: str, markdown: str) -> None:
        self.sections[key] = markdown
        order = ["machine", "tests", "bench", "projection", "profile", "table"]
        body = "\n\n".join(self.sections[k] for k in order if k in self.sections)
        self.write("summary.md", f"# fusionkd GPU check\n\nWritten by `{TOOL}`; every number is also in "
                                 f"numbers.json, and all output in log.txt.\n\n{body}\n")


# ---------------------------------------------------------------------- the machine
def machine(device: torch.device, out: Out) -> dict[str, Any]:
    from fusionkd.engine.hardware import hardware_info

    info = hardware_info(device)
    info["cuda"] = torch.version.cuda
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                    multiprocessors=p.multi_processor_count, bf16=torch.cuda.is_bf16_supported())
        smi = shutil.which("nvidia-smi")
        if smi:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                info["nvidia_smi"] = subprocess.run([smi, "--query-gpu=name,driver_version,power.limit,clocks.max.sm",
                                                     "--format=csv,noheader"], capture_output=True, text=True,
                                                    timeout=20).stdout.strip()
    info["peak_tflops"] = dict(zip(("bf16", "tf32"), peak_tflops(info.get("gpu", "")) or (None, None)))
    out.put("machine", info)
    rows = "\n".join(f"| {k} | {v} |" for k, v in info.items())
    out.section("machine", f"## Machine\n\n| what | value |\n|---|---|\n{rows}")
    out.say(f"device {device}: {info.get('gpu') or info['cpu']}, torch {info['torch']}, CUDA {info['cuda']}")
    return info


def peak_tflops(gpu_name: str) -> tuple[float, float] | None:
    for key, peaks in GPU_PEAKS:
        if key in gpu_name:
            return peaks
    return None


# ---------------------------------------------------------------------- stage: tests
def pythonpath_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of child processes: fusionkd from src/, the kit only for what the machine lacks."""
    parts = [str(ROOT / "src")]
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    if KIT.joinpath("site").is_dir() and MISSING:
        parts.append(str(KIT / "site"))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(parts), **(extra or {})}


def stage_tests(args: argparse.Namespace, out: Out) -> None:
    if importlib.util.find_spec("pytest") is None:
        out.say("tests: pytest is neither installed nor in .gpu-kit/site (make gpu-kit): stage skipped")
        out.put("tests", {"skipped": "pytest not available"})
        return
    files = list(CUDA_TEST_FILES)
    if importlib.util.find_spec("PIL") is None:  # Pillow is not in the kit (15 MB): its store test cannot load
        files.remove("tests/test_data_large.py")
        out.say("tests: Pillow is not installed: tests/test_data_large.py (the store loader's CUDA test) left out")
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-rA", *files]  # -q: pyproject
    extra = {"OMP_NUM_THREADS": "1"}
    if args.dry_run:  # the same tests, on the CPU (their rehearsal mode); the slowest (compile) left out
        extra["FUSIONKD_CUDA_TESTS_ON_CPU"] = "1"
        cmd += ["-k", "not compile"]
    out.say("tests: " + " ".join(cmd[1:]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=pythonpath_env(extra), capture_output=True, text=True,
                              timeout=args.tests_minutes * 60)
        text, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        text, code = text + f"\n(stopped after {args.tests_minutes} minutes)", None
    out.write("tests.txt", text)
    tail = [ln for ln in text.splitlines() if ln.strip()][-1:] or ["(no output)"]
    counts = {k: sum(1 for ln in text.splitlines() if ln.startswith(k.upper() + " ")) for k in
              ("passed", "failed", "error", "skipped")}
    res = {"exit_code": code, "seconds": round(time.perf_counter() - t0, 1), "last_line": tail[0], **counts}
    out.put("tests", res)
    out.say(f"tests: exit {code}, {tail[0]}")
    failed = [ln for ln in text.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    out.section("tests", "## CUDA tests\n\n" + f"`pytest -m cuda`: exit code {code}, {tail[0]} "
                f"({res['seconds']} s). Whole output in tests.txt.\n" + "".join(f"\n- {ln}" for ln in failed))


# ---------------------------------------------------------------------- stage: bench
class Bench:
    """Training steps as the engine takes them, fed by a DeviceLoader over synthetic uint8 data on the device."""

    def __init__(self, args: argparse.Namespace, device: torch.device, out: Out, in_chans: int = 3,
                 mean: tuple[float, ...] = (0.5071, 0.4865, 0.4409), std: tuple[float, ...] = (0.2673, 0.2564, 0.2762)
                 ) -> None:
        from fusionkd.data import ArrayDataset, DatasetInfo

        self.args, self.device, self.out = args, device, out
        c, s, k = in_chans, args.image_size, args.num_classes
        self.info = DatasetInfo(name=f"synthetic {c}x{s}x{s}", classes=[f"c{i}" for i in range(k)], mean=mean,
                                std=std, in_chans=c, image_size=s)
        g = torch.Generator().manual_seed(0)
        n = args.train_images
        images = torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, k, (n,), generator=g)
        self.data = ArrayDataset(images.to(device), labels.to(device))
        m = min(args.eval_images, n)
        self.eval_data = ArrayDataset(images[:m].to(device), labels[:m].to(device))
        self.flops: dict[tuple[str, str], float] = {}

    def _config(self, method: str, model: str, batch: int, setting: str):
        from fusionkd.engine.config import resolve_config

        precision, cl, comp = SETTINGS[setting]
        layer = {"method": method, "model": model, "dataset": "synthetic", "epochs": 10, "batch_size": batch,
                 "precision": precision, "channels_last": cl, "compile": comp, "device": str(self.device),
                 "threads": torch.get_num_threads(), "eval_batch_size": self.args.eval_batch}
        from fusionkd.methods import METHODS

        if METHODS.get(method).needs_teacher:
            layer["teacher"] = f"random-init {self.args.teacher_model}"
        return resolve_config(layer)

    def _build(self, cfg):
        from fusionkd.data import DeviceLoader
        from fusionkd.engine.build import build_method, compile_networks
        from fusionkd.engine.optim import build_optimizer
        from fusionkd.engine.precision import Precision
        from fusionkd.methods import METHODS

        info = self.info
        meta = ({"model": self.args.teacher_model, "model_kwargs": {}, "path": "random weights (gpu_check)"}
                if METHODS.get(cfg.method).needs_teacher else None)
        torch.manual_seed(0)
        method = build_method(cfg, info, self.device, teacher_meta=meta)
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        method = method.to(memory_format=fmt)
        if cfg.compile:
            compile_networks(method)
        optimizer = build_optimizer(method.param_groups(cfg.weight_decay), cfg, cfg.lr)
        precision = Precision(self.device, cfg.precision, cfg.grad_clip)
        loader = DeviceLoader(self.data, info, cfg.batch_size, train=True, device=self.device, seed=0,
                              channels_last=cfg.channels_last)
        return method, optimizer, precision, loader, info

    def _steps(self, method, optimizer, precision, batches, epoch: int) -> torch.Tensor:
        """Training steps exactly as Trainer._train_epoch takes them (no host sync inside)."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        loss = torch.zeros((), device=self.device)
        for images, labels in batches:
            with precision.autocast:
                terms = method.training_step(images, labels, epoch)
            loss = sum(v.float() for v in terms.values())
            precision.step(loss, optimizer, params)
        return loss.detach()

    def measure(self, method_name: str, model: str, batch: int, setting: str) -> dict[str, Any]:
        a, dev = self.args, self.device
        cfg = self._config(method_name, model, batch, setting)
        self._free()
        base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t_build = time.perf_counter()
        method, optimizer, precision, loader, info = self._build(cfg)
        epoch = cfg.epochs // 2
        method.on_epoch_start(epoch)
        method.train()
        batches = _cycle(loader)
        t_first = time.perf_counter()
        self._steps(method, optimizer, precision, _take(batches, a.warmup), epoch)
        self._sync()
        warm_s = time.perf_counter() - t_first
        times = []
        loss = None
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            loss = self._steps(method, optimizer, precision, _take(batches, a.steps), epoch)
            self._sync()
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        r: dict[str, Any] = {
            "method": method_name, "model": model, "batch": batch, "setting": setting,
            "img_per_s": batch * a.steps / median, "step_ms": 1000 * median / a.steps,
            "step_ms_min": 1000 * min(times) / a.steps, "warmup_s": round(warm_s, 2),
            "build_s": round(t_first - t_build, 2), "loss_finite": bool(torch.isfinite(loss).item()),
        }
        if dev.type == "cuda":
            r["peak_memory_mib"] = round((torch.cuda.max_memory_allocated(dev) - base) / 2**20, 1)
        key = (method_name, model)
        if key not in self.flops and not cfg.compile:
            self.flops[key] = self._flops_per_image(method, optimizer, precision, loader, epoch, batch)
        if key in self.flops:
            r["gflop_per_img"] = round(self.flops[key] / 1e9, 4)
            r["achieved_tflops"] = round(self.flops[key] * r["img_per_s"] / 1e12, 3)
        del method, optimizer, precision, loader
        self._free(compiled=cfg.compile)
        return r

    def _flops_per_image(self, method, optimizer, precision, loader, epoch: int, batch: int) -> float:
        """Forward + backward FLOPs of one training step / batch (torch.utils.flop_counter)."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        images, labels = next(iter(loader))
        params = [p for g in optimizer.param_groups for p in g["params"]]
        with counter:
            with precision.autocast:
                terms = method.training_step(images, labels, epoch)
            precision.step(sum(v.float() for v in terms.values()), optimizer, params)
        return counter.get_total_flops() / batch

    def eval_speed(self, model: str, setting: str) -> dict[str, Any]:
        from fusionkd.data import DeviceLoader
        from fusionkd.engine.evaluation import evaluate

        cfg = self._config("baseline", model, min(128, len(self.data)), setting)
        method, _, precision, _, info = self._build(cfg)
        loader = DeviceLoader(self.eval_data, info, self.args.eval_batch, train=False, device=self.device,
                              channels_last=cfg.channels_last)
        evaluate(method, loader, precision.autocast)  # warm-up (and compilation)
        self._sync()
        times = []
        for _ in range(max(1, self.args.repeats)):
            t0 = time.perf_counter()
            evaluate(method, loader, precision.autocast)
            times.append(time.perf_counter() - t0)
        del method
        self._free(compiled=cfg.compile)
        return {"model": model, "setting": setting, "eval_batch": self.args.eval_batch,
                "eval_img_per_s": len(self.eval_data) / statistics.median(times)}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _free(self, compiled: bool = False) -> None:
        if compiled:
            torch._dynamo.reset()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _cycle(loader):
    while True:
        yield from loader


def _take(it, n: int):
    for _ in range(n):
        yield next(it)


def bench_plan(args: argparse.Namespace) -> list[tuple[str, str, int, str]]:
    """(method, model, batch, setting) in priority order: FFL-S ResNet-32 and the baseline first (the
    projection needs them), the eager settings before compile (compiling is what the budget cuts first)."""
    methods = args.methods
    first = [m for m in ("baseline", "ffl_s") if m in methods]
    ordered = first + [m for m in methods if m not in first]
    plan = []
    eager = [s for s in args.settings if not SETTINGS[s][2]]
    compiled = [s for s in args.settings if SETTINGS[s][2]]
    for settings in (eager, compiled):
        for batch in sorted(args.batches, reverse=True):
            for model in args.models:
                for setting in settings:
                    plan += [(m, model, batch, setting) for m in ordered]
    return plan


def stage_bench(args: argparse.Namespace, device: torch.device, out: Out, info: dict[str, Any]) -> list[dict]:
    deadline = time.perf_counter() + args.bench_minutes * 60
    bench = Bench(args, device, out)
    out.say(f"bench: {args.train_images} synthetic {args.image_size}px images on {device}, "
            f"{len(args.methods)} methods x {args.models} x batch {args.batches} x {args.settings}, "
            f"budget {args.bench_minutes} min")
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    cost: dict[bool, float] = {False: 0.0, True: 0.0}  # the slowest measurement so far, eager / compiled
    for method, model, batch, setting in bench_plan(args):
        compiled = SETTINGS[setting][2]
        left = deadline - time.perf_counter()
        if left < max(cost[compiled], 1.0):
            skipped.append(f"{method}/{model}/b{batch}/{setting}")
            continue
        t0 = time.perf_counter()
        try:
            r = bench.measure(method, model, batch, setting)
        except Exception as e:  # noqa: BLE001 (one failing combination must not cost the others)
            r = {"method": method, "model": model, "batch": batch, "setting": setting,
                 "error": f"{type(e).__name__}: {e}"[:500]}
            bench._free(compiled=compiled)
        cost[compiled] = max(cost[compiled], time.perf_counter() - t0)
        results.append(r)
        out.say("bench " + _row_text(r))
        _publish_bench(out, results, skipped, info, args)
    evals = []
    for model in args.models:
        for setting in args.settings:
            if SETTINGS[setting][2] and deadline - time.perf_counter() < cost[True]:
                continue
            with contextlib.suppress(Exception):
                evals.append(bench.eval_speed(model, setting))
                out.say(f"eval {model} {setting}: {evals[-1]['eval_img_per_s']:,.0f} img/s")
    out.put("eval", evals)
    _publish_bench(out, results, skipped, info, args, evals)
    if skipped:
        out.say(f"bench: {len(skipped)} combinations left out by the time budget")
    return results


def _row_text(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['method']} {r['model']} b{r['batch']} {r['setting']}: FAILED {r['error']}"
    mem = f", {r['peak_memory_mib']:,.0f} MiB" if "peak_memory_mib" in r else ""
    return (f"{r['method']} {r['model']} b{r['batch']} {r['setting']}: {r['img_per_s']:,.0f} img/s, "
            f"{r['step_ms']:.2f} ms/step{mem}")


def _publish_bench(out: Out, results: list[dict], skipped: list[str], info: dict[str, Any],
                   args: argparse.Namespace, evals: list[dict] | None = None) -> None:
    base = {(r["model"], r["batch"], r["setting"]): r["img_per_s"] for r in results
            if r["method"] == "baseline" and "error" not in r}
    peaks = info.get("peak_tflops") or {}
    for r in results:
        b = base.get((r["model"], r["batch"], r["setting"]))
        if "error" not in r and b:
            r["time_ratio"] = round(b / r["img_per_s"], 3)
        peak = peaks.get("bf16" if r["setting"] != "fp32" else "tf32")
        if "achieved_tflops" in r and peak:
            r["fraction_of_peak"] = round(r["achieved_tflops"] / peak, 4)
    out.put("bench", {"protocol": bench_protocol(args), "results": results, "left_out": skipped})
    head = ("| method | model | batch | setting | img/s | ms/step | x baseline | peak MiB | TFLOP/s | of peak |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        if "error" in r:
            rows.append(f"| {r['method']} | {r['model']} | {r['batch']} | {r['setting']} | FAILED: "
                        f"{r['error'][:120]} | | | | | |")
            continue
        rows.append(f"| {r['method']} | {r['model']} | {r['batch']} | {r['setting']} | {r['img_per_s']:,.0f} | "
                    f"{r['step_ms']:.2f} | {r.get('time_ratio', '-')} | {r.get('peak_memory_mib', '-')} | "
                    f"{r.get('achieved_tflops', '-')} | {_pct(r.get('fraction_of_peak'))} |")
    ev = ""
    if evals:
        ev = "\n\nEvaluation (the deployed network, inference mode):\n\n| model | setting | img/s |\n|---|---|---|\n" \
            + "\n".join(f"| {e['model']} | {e['setting']} | {e['eval_img_per_s']:,.0f} |" for e in evals)
    left = f"\n\nLeft out by the time budget ({len(skipped)}): {', '.join(skipped)}" if skipped else ""
    out.section("bench", "## Training throughput\n\n" + bench_protocol(args) + "\n\n" + head + "\n"
                + "\n".join(rows) + ev + left)
    proj = projection(results, evals or [], args)
    if proj:
        out.put("projection", proj)
        out.section("projection", proj["markdown"])


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def bench_protocol(args: argparse.Namespace) -> str:
    return (f"Protocol: {args.train_images:,} synthetic uint8 images of 3x{args.image_size}x{args.image_size}, "
            f"{args.num_classes} classes, held on the device and served by DeviceLoader (random crop with 4 px "
            "zero padding + flip, normalisation on the device); each step is the engine's (autocast forward, "
            "loss terms summed in fp32, zero_grad/backward/clip/step through engine.precision.Precision, SGD "
            "momentum 0.9 nesterov off, the methods' default options, in the middle epoch of a 10-epoch run); "
            f"{args.warmup} warm-up steps, then the median of {args.repeats} blocks of {args.steps} steps "
            f"(synchronised at block ends only). Offline methods use a random-init {args.teacher_model} teacher. "
            "peak MiB = torch.cuda.max_memory_allocated above what was allocated before the method was built "
            "(the data set excluded). TFLOP/s = forward+backward FLOPs per image (torch.utils.flop_counter, "
            "counted once per method and model) x img/s; 'of peak' against the GPU's dense bf16 peak (TF32 "
            "peak for fp32, whose convolutions run as TF32 by default).")


def projection(results: list[dict], evals: list[dict], args: argparse.Namespace) -> dict[str, Any] | None:
    """FFL-S ResNet-32 CIFAR-100 recipe: 300 epochs x 50,000 training images + a 10,000-image evaluation per
    epoch, from the measured img/s. At the recipe's batch 128 and at the fastest measured batch."""
    rows = [r for r in results if r["method"] == "ffl_s" and r["model"] == "resnet32" and "error" not in r]
    if not rows:
        return None
    ev = {e["setting"]: e["eval_img_per_s"] for e in evals if e["model"] == "resnet32"}
    out: dict[str, Any] = {"recipe": "FFL-S ResNet-32, CIFAR-100: 300 epochs x 50,000 images, evaluation of "
                                     "10,000 images after every epoch", "goal_s": 600, "cases": []}
    for label, pick in (("recipe batch 128", [r for r in rows if r["batch"] == 128]), ("fastest measured", rows)):
        if not pick:
            continue
        best = max(pick, key=lambda r: r["img_per_s"])
        train_s = 50_000 / best["img_per_s"]
        eval_s = 10_000 / ev[best["setting"]] if best["setting"] in ev else None
        epoch_s = train_s + (eval_s or 0.0)
        out["cases"].append({"case": label, "batch": best["batch"], "setting": best["setting"],
                             "img_per_s": round(best["img_per_s"]), "epoch_train_s": round(train_s, 2),
                             "epoch_eval_s": None if eval_s is None else round(eval_s, 2),
                             "projected_300_epochs_s": round(300 * epoch_s, 1),
                             "meets_10_min_goal": 300 * epoch_s <= 600})
    lines = [f"| {c['case']} | {c['batch']} | {c['setting']} | {c['img_per_s']:,} | {c['epoch_train_s']} | "
             f"{c['epoch_eval_s'] if c['epoch_eval_s'] is not None else 'not measured'} | "
             f"{c['projected_300_epochs_s'] / 60:.1f} min | {'yes' if c['meets_10_min_goal'] else 'no'} |"
             for c in out["cases"]]
    out["markdown"] = ("## Projection: the FFL-S ResNet-32 CIFAR-100 recipe\n\n" + out["recipe"] + ", projected "
                       "from the measured img/s (training steps and evaluation only; no data loading from disk, "
                       "no checkpoint writes). Goal: under 10 minutes (~25,000 training img/s).\n\n"
                       "| case | batch | setting | train img/s | train s/epoch | eval s/epoch | 300 epochs | "
                       "under 10 min |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(lines))
    return out


# ---------------------------------------------------------------------- stage: profile
def stage_profile(args: argparse.Namespace, device: torch.device, out: Out, results: list[dict]) -> None:
    from torch.profiler import ProfilerActivity, profile

    eager = [r for r in results if "error" not in r and not SETTINGS[r["setting"]][2]
             and r["method"] in FUSION_METHODS and r.get("time_ratio")]
    if eager:
        slow = max(eager, key=lambda r: r["time_ratio"])
        method_name, model, batch, setting = slow["method"], slow["model"], slow["batch"], slow["setting"]
        why = f"the slowest fusion method measured ({slow['time_ratio']}x baseline)"
    else:
        method_name, model, batch, setting = "frskd", args.models[0], max(args.batches), args.settings[0]
        if setting not in SETTINGS or SETTINGS[setting][2]:
            setting = "fp32"
        why = "no bench results to choose from: frskd"
    out.say(f"profile: {method_name} {model} b{batch} {setting} ({why})")
    bench = Bench(args, device, out)
    cfg = bench._config(method_name, model, batch, setting)
    method, optimizer, precision, loader, _ = bench._build(cfg)
    method.on_epoch_start(cfg.epochs // 2)
    method.train()
    batches = _cycle(loader)
    bench._steps(method, optimizer, precision, _take(batches, args.warmup), cfg.epochs // 2)
    bench._sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    n = args.profile_steps
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        bench._steps(method, optimizer, precision, _take(batches, n), cfg.epochs // 2)
        bench._sync()
    wall = (time.perf_counter() - t0) / n
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        table = events.table(sort_by=sort, row_limit=40)
    except (KeyError, AttributeError, RuntimeError):  # the column's name differs between torch versions
        sort = "self_device_time_total" if device.type == "cuda" else sort
        table = events.table(sort_by=sort, row_limit=40)
    dev_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events) \
        if device.type == "cuda" else 0
    kernels = sum(e.count for e in events if getattr(e, "device_type", None) is not None
                  and str(e.device_type).endswith("CUDA")) if device.type == "cuda" else 0
    res = {"method": method_name, "model": model, "batch": batch, "setting": setting, "why": why,
           "steps": n, "wall_ms_per_step": round(1000 * wall, 3),
           "device_busy_ms_per_step": round(dev_us / 1000 / n, 3) if dev_us else None,
           "kernels_per_step": round(kernels / n, 1) if kernels else None}
    if res["device_busy_ms_per_step"]:
        res["device_busy_fraction"] = round(res["device_busy_ms_per_step"] / res["wall_ms_per_step"], 3)
    out.write("profile.txt", f"{method_name} {model} batch {batch} {setting}, {n} training steps ({why})\n"
                             f"{json.dumps(res)}\nsorted by {sort}\n\n{table}\n")
    out.put("profile", res)
    busy = res.get("device_busy_fraction")
    verdict = ("" if busy is None else
               f" The GPU was busy {100 * busy:.0f} % of the wall time"
               + (": launch/host bound (the CPU cannot issue kernels fast enough)." if busy < 0.7 else
                  ": mostly busy with kernels." ))
    out.section("profile", f"## Profile\n\n{method_name} {model}, batch {batch}, {setting} ({why}): "
                           f"{res['wall_ms_per_step']} ms per step, {res['kernels_per_step']} kernels per step."
                           f"{verdict} Top operators in profile.txt.")
    out.say(f"profile: {json.dumps(res)}")


# ---------------------------------------------------------------------- stage: table
def stage_table(args: argparse.Namespace, device: torch.device, out: Out, work: Path) -> None:
    """baseline, ffl and frskd on the whole Fashion-MNIST training set, one seed, through `fusionkd compare`."""
    from fusionkd.data import load_dataset

    data_dir = args.data_dir
    try:
        splits = load_dataset("fashion-mnist", data_dir=data_dir, val_fraction=args.table_val_fraction,
                              seed=0, subset=args.table_subset)
    except Exception as e:  # noqa: BLE001 (reported, the stage is skipped)
        out.say(f"table: Fashion-MNIST not found ({e}); give --data-dir (make gpu-kit copies it to "
                ".gpu-kit/fashion-mnist): stage skipped")
        out.put("table", {"skipped": str(e)})
        return
    n_train = len(splits.train)
    common = {"batch_size": 64, "lr": 0.05, "schedule": "cosine", "nesterov": True, "weight_decay": 0.0005,
              "val_fraction": args.table_val_fraction, "data_seed": 0, "eval_every": 1, "eval_batch_size": 1000,
              "precision": args.table_precision, "channels_last": True}
    if data_dir:
        common["data_dir"] = str(data_dir)
    if args.table_subset:
        common["subset"] = args.table_subset
    methods = args.table_methods
    epochs = args.table_epochs or table_epochs(args, device, methods, common, n_train, out)
    cmd = [sys.executable, "-m", "fusionkd", "compare", "--methods", ",".join(methods), "--models", args.table_model,
           "--dataset", "fashion-mnist", "--seeds", "0", "--out", str(work / "table"), "--workers", "1",
           "--devices", str(device), *[f"{k}={v}" for k, v in common.items()], f"epochs={epochs}"]
    protocol = (f"Fashion-MNIST, {n_train:,} training images (all that is left after a {args.table_val_fraction:.0%} "
                f"validation split, used for model selection only; data_seed 0), the full 10,000-image test set; "
                f"{args.table_model}, one seed (0), {epochs} epochs (as many as the time budget of "
                f"{args.table_minutes} min allowed by a timing probe), batch 64, SGD lr 0.05 nesterov, weight decay "
                f"5e-4, cosine schedule, {args.table_precision} + channels_last, evaluation every epoch; the "
                "methods' default options. Same settings as docs/results.md except "
                + ("the epochs and the subset (none: the whole training set)." if not args.table_subset else
                   f"the epochs and the subset ({args.table_subset} images: a dry run)."))
    out.say(f"table: {' '.join(cmd[2:])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=pythonpath_env({"OMP_NUM_THREADS": "4"}), capture_output=True,
                          text=True)
    out.log.write(proc.stdout[-20000:] + proc.stderr[-20000:])
    out.log.flush()
    report = work / "table" / "report.md"
    res: dict[str, Any] = {"protocol": protocol, "epochs": epochs, "exit_code": proc.returncode,
                           "seconds": round(time.perf_counter() - t0, 1), "command": " ".join(cmd[1:])}
    res["runs"] = [_run_numbers(p) for p in sorted((work / "table" / "runs").glob("*/*/s*/summary.json"))]
    out.put("table", res)
    body = report.read_text() if report.is_file() else f"(no report: compare exited {proc.returncode})"
    body = "\n".join(ln for ln in body.splitlines() if not ln.startswith("!["))  # its plots stay in --work
    out.write("table.md", f"# Fashion-MNIST, full training set, on {device}\n\n{protocol}\n\n"
                          f"Command: `{res['command']}`\n\n{body}\n")
    runs = "\n".join(f"| {r['method']} | {r['best_epoch']} | {r['best_val']} | {r['test_at_best']} | {r['test_last']} "
                     f"| {r['train_img_per_s']} |" for r in res["runs"])
    out.section("table", f"## Fashion-MNIST, full data\n\n{protocol}\n\n| method | best epoch (val) | val % | "
                         f"test % at best | test % last epoch | train img/s |\n|---|---|---|---|---|---|\n{runs}\n\n"
                         "The whole report (compare's) is in table.md.")
    out.say(f"table: compare exit {proc.returncode} after {res['seconds']} s")


def _run_numbers(summary_path: Path) -> dict[str, Any]:
    """One run's row from its summary.json (best = best-validation epoch; last = last epoch)."""
    s = json.loads(summary_path.read_text())
    head = s.get("deploy_head", "net")
    best, last = s.get("best") or {}, s.get("last") or {}
    def pct(split: dict | None) -> float | None:
        v = (split or {}).get(head)
        return None if v is None else round(v, 2)

    return {"method": s.get("method"), "best_epoch": best.get("epoch"), "best_val": pct(best.get("val")),
            "test_at_best": pct(best.get("test")), "last_epoch": last.get("epoch"), "test_last": pct(last.get("test")),
            "train_img_per_s": round(s["img_per_s"]) if s.get("img_per_s") else None,
            "train_time_s": s.get("train_time_s"), "eval_time_s": s.get("eval_time_s")}


def table_epochs(args: argparse.Namespace, device: torch.device, methods: list[str], common: dict[str, Any],
                 n_train: int, out: Out) -> int:
    """As many epochs as fit the budget: time each method's steps on 1x28x28 batches (the Bench machinery),
    add the evaluation, and divide, keeping 15 % for start-up and checkpoints."""
    probe = argparse.Namespace(**{**vars(args), "image_size": 28, "num_classes": 10, "train_images": 2048,
                                  "eval_images": 1000, "warmup": 3, "repeats": 2, "steps": 5,
                                  "eval_batch": 1000})
    bench = Bench(probe, device, out, in_chans=1, mean=(0.2860,), std=(0.3530,))
    per_epoch = 0.0
    for m in methods:
        r = bench.measure(m, args.table_model, int(common["batch_size"]),
                          "bf16+cl" if common["precision"] == "bf16" else "fp32")
        per_epoch += n_train / r["img_per_s"] + 13_000 / max(r["img_per_s"] * 4, 1)  # eval ~4x the train speed
        out.say(f"table probe {m}: {r['img_per_s']:,.0f} img/s")
    epochs = max(1, min(args.table_max_epochs, int(0.85 * args.table_minutes * 60 / per_epoch)))
    out.say(f"table: {per_epoch:.1f} s per epoch of all {len(methods)} methods -> {epochs} epochs")
    return epochs


# ---------------------------------------------------------------------- driver
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder for the (at most six) result files; empty or a previous output")
    p.add_argument("--stages", default="tests,bench,profile", help=f"comma-separated, of {','.join(STAGES)}")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes (2 methods, a few steps, 1 epoch): checks the script itself, e.g. on a CPU")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or (for --dry-run) cpu")
    p.add_argument("--work", type=Path, default=None, help="scratch folder for run folders (default: a temp dir)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="Fashion-MNIST's four .gz files (default: .gpu-kit/fashion-mnist if present, else the "
                        "installed copy)")
    g = p.add_argument_group("bench")
    g.add_argument("--methods", default=",".join(BENCH_METHODS))
    g.add_argument("--models", default="resnet32,wrn_16_2")
    g.add_argument("--batches", default="128,512")
    g.add_argument("--settings", default=",".join(SETTINGS))
    g.add_argument("--train-images", type=int, default=50_000)
    g.add_argument("--eval-images", type=int, default=10_000)
    g.add_argument("--image-size", type=int, default=32)
    g.add_argument("--num-classes", type=int, default=100)
    g.add_argument("--eval-batch", type=int, default=1024)
    g.add_argument("--teacher-model", default="resnet56")
    g.add_argument("--warmup", type=int, default=5, help="steps before timing (compiling happens here)")
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--steps", type=int, default=10)
    g.add_argument("--profile-steps", type=int, default=10)
    g.add_argument("--bench-minutes", type=float, default=3.5)
    g.add_argument("--tests-minutes", type=float, default=4.0, help="a cap; ~2-3 min expected")
    t = p.add_argument_group("table")
    t.add_argument("--table-methods", default="baseline,ffl,frskd")
    t.add_argument("--table-model", default="resnet20")
    t.add_argument("--table-minutes", type=float, default=4.0)
    t.add_argument("--table-epochs", type=int, default=0, help="0: as many as fit --table-minutes")
    t.add_argument("--table-max-epochs", type=int, default=200)
    t.add_argument("--table-precision", default="bf16", choices=("fp32", "bf16"))
    t.add_argument("--table-val-fraction", type=float, default=0.05)
    t.add_argument("--table-subset", type=int, default=0, help="0: the whole training set")
    a = p.parse_args(argv)
    a.stages = [s for s in a.stages.split(",") if s]
    bad = [s for s in a.stages if s not in STAGES]
    if bad:
        p.error(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    a.methods = [m for m in a.methods.split(",") if m]
    a.models = [m for m in a.models.split(",") if m]
    a.batches = [int(b) for b in a.batches.split(",") if b]
    a.settings = [s for s in a.settings.split(",") if s]
    a.table_methods = [m for m in a.table_methods.split(",") if m]
    if [s for s in a.settings if s not in SETTINGS]:
        p.error(f"--settings: choose from {', '.join(SETTINGS)}")
    from fusionkd.methods import METHODS

    for m in a.methods + a.table_methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; known: {', '.join(sorted(METHODS.names()))}")
    if a.dry_run:  # the same code, tiny: two methods, one small batch, eager settings, a few steps
        a.methods = [m for m in a.methods if m in ("baseline", "ffl_s")] or a.methods[:2]
        a.models, a.batches = a.models[:1], [8]
        a.settings = [s for s in a.settings if not SETTINGS[s][2]]
        a.train_images, a.eval_images, a.eval_batch = 64, 32, 16
        a.warmup, a.repeats, a.steps, a.profile_steps = 1, 2, 2, 2
        a.table_methods, a.table_max_epochs = a.table_methods[:2], 1  # the timing probe still runs
        a.table_subset = a.table_subset or 200
    if a.data_dir is None and KIT.joinpath("fashion-mnist").is_dir():
        a.data_dir = KIT / "fashion-mnist"
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); on a CPU use --dry-run "
              "--device cpu", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Out(args.out)
    out.say(f"gpu_check {'(dry run) ' if args.dry_run else ''}stages {','.join(args.stages)} -> {args.out}")
    out.put("args", {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    info = machine(device, out)
    work = args.work or Path(tempfile.mkdtemp(prefix="fusionkd-gpu-check-"))
    results: list[dict] = []
    status = 0
    for stage in [s for s in STAGES if s in args.stages]:
        t0 = time.perf_counter()
        try:
            if stage == "tests":
                stage_tests(args, out)
            elif stage == "bench":
                results = stage_bench(args, device, out, info)
            elif stage == "profile":
                stage_profile(args, device, out, results)
            elif stage == "table":
                stage_table(args, device, out, work)
        except Exception as e:  # noqa: BLE001 (a failing stage must not cost the next ones)
            import traceback

            status = 1
            out.say(f"{stage}: FAILED {type(e).__name__}: {e}\n{traceback.format_exc()}")
            out.put(f"{stage}_error", f"{type(e).__name__}: {e}")
        out.say(f"{stage}: {time.perf_counter() - t0:.1f} s")
    out.put("finished", time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    out.say(f"done; results in {args.out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
