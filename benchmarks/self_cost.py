"""Training cost of the self-distillation methods relative to ``baseline`` on one backbone (CPU).

Two measurements:

1. **Throughput**, interleaved: every method is built in this process and the methods take turns, one
   training step each per round (forward + loss terms + backward + SGD step, as in the engine), so that
   slow-downs from other processes on the machine hit every method alike; after the warm-up rounds, the
   median step time per method is reported as img/s and as a ratio to ``baseline``.
2. **Peak memory**, isolated: each method is trained for a few steps in a fresh subprocess; the reported
   figure is the growth of the process's peak resident set size (``resource.getrusage(...).ru_maxrss``)
   from after the method, optimizer and batch are built to the end of the steps: activations, gradients,
   optimizer state and allocator caches of a training step. The child's own median step time is reported
   too (not interleaved, so noisier).

Usage (defaults: 1 thread, resnet20, 1x28x28, batch 128, fp32)::

    python benchmarks/self_cost.py
    python benchmarks/self_cost.py --precision bf16 --channels-last --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fusionkd.engine.trainer import cpu_name
from fusionkd.methods import METHODS, MethodContext, count_parameters

DEFAULT_METHODS = ["baseline", "byot", "frskd", "fmfsd"]


def max_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Runner:
    """One method with its optimizer and a fixed random batch; ``step()`` is one timed training step."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        torch.manual_seed(0)
        ctx = MethodContext(model=args.model, num_classes=10, in_chans=args.in_chans, image_size=args.size,
                            epochs=args.epochs_hint)
        self.method = METHODS.get(name)(ctx)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        self.method = self.method.to(memory_format=fmt)
        self.method.train()
        groups = self.method.param_groups(5e-4)
        self.opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(args.batch, args.in_chans, args.size, args.size, generator=g).to(memory_format=fmt)
        self.y = torch.randint(0, 10, (args.batch,), generator=g)
        self.bf16 = args.precision == "bf16"

    def saved_activation_mib(self) -> float:
        """MiB of the distinct tensors autograd saves for the backward of one ``training_step`` (storages
        counted once; parameters excluded): the activation memory of a step, independent of the allocator."""
        params = {p.untyped_storage().data_ptr() for p in self.method.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        amp = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
            terms = self.method.training_step(self.x, self.y, 0)
        del terms
        return sum(seen.values()) / 2**20

    def step(self) -> float:
        t0 = time.perf_counter()
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with amp:
            terms = self.method.training_step(self.x, self.y, 0)
        loss = sum(v.float() for v in terms.values())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0


def child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Isolated run of one method (fresh process): peak-RSS growth over the training steps + step times."""
    torch.set_num_threads(args.threads)
    runner = Runner(name, args)
    before = max_rss_mib()
    times = [runner.step() for _ in range(args.warmup + args.child_steps)][args.warmup:]
    grown = max_rss_mib() - before
    return {
        "method": name,
        "saved_activations_mib": runner.saved_activation_mib(),
        "peak_rss_growth_mib": grown,
        "rss_before_mib": before,
        "isolated_step_ms": 1000 * statistics.median(times),
        "params_total": count_parameters(runner.method),
        "params_extra": int(runner.method.extra_parameters()),
    }


def interleaved(methods: list[str], args: argparse.Namespace) -> dict[str, list[float]]:
    """Step times of every method, taking turns, after ``warmup`` rounds."""
    runners = {m: Runner(m, args) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.warmup + args.steps):
        for m, runner in runners.items():
            t = runner.step()
            if r >= args.warmup:
                times[m].append(t)
    return times


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--model", default="resnet20")
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (rounds) first")
    p.add_argument("--steps", type=int, default=15, help="timed rounds of the interleaved measurement")
    p.add_argument("--child-steps", type=int, default=6, help="timed steps of each isolated memory run")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--epochs-hint", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error(f"--steps must be at least 2 (the spread needs two timed rounds), got {args.steps}")

    if args.child:
        print(json.dumps(child(args.child, args)))
        return {}

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "baseline" not in methods:
        methods.insert(0, "baseline")
    passthrough = ["--model", args.model, "--in-chans", str(args.in_chans), "--size", str(args.size),
                   "--batch", str(args.batch), "--threads", str(args.threads), "--warmup", str(args.warmup),
                   "--child-steps", str(args.child_steps), "--precision", args.precision]
    passthrough += ["--channels-last"] if args.channels_last else []
    isolated = {}
    for m in methods:
        out = subprocess.run([sys.executable, __file__, *passthrough, "--child", m], check=True,
                             capture_output=True, text=True)
        isolated[m] = json.loads(out.stdout.strip().splitlines()[-1])

    torch.set_num_threads(args.threads)
    times = interleaved(methods, args)
    base_ms = 1000 * statistics.median(times["baseline"])
    base_mem = isolated["baseline"]["peak_rss_growth_mib"]
    rows = []
    for m in methods:
        ms = 1000 * statistics.median(times[m])
        mem = isolated[m]["peak_rss_growth_mib"]
        rows.append({
            **isolated[m],
            "step_ms": ms,
            "step_ms_iqr": [1000 * q for q in statistics.quantiles(times[m], n=4)[::2]],
            "img_per_s": args.batch / (ms / 1000),
            "time_ratio": ms / base_ms,
            "memory_ratio": mem / base_mem if base_mem > 0 else float("nan"),
        })
    result = {
        "hardware": {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__},
        "setup": {"model": args.model, "input": [args.in_chans, args.size, args.size], "batch": args.batch,
                  "precision": args.precision, "channels_last": args.channels_last, "warmup": args.warmup,
                  "steps": args.steps, "child_steps": args.child_steps},
        "rows": rows,
    }
    print(f"{result['hardware']['cpu']}, {args.threads} thread(s), torch {torch.__version__}; {args.model} "
          f"{args.in_chans}x{args.size}x{args.size}, batch {args.batch}, {args.precision}"
          f"{', channels_last' if args.channels_last else ''}")
    print("| method | params (extra) | step ms (median, interleaved) | img/s | time x baseline "
          "| peak RSS growth MiB (x baseline) | saved activations MiB (x baseline) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base_act = isolated["baseline"]["saved_activations_mib"]
    for r in rows:
        print(f"| {r['method']} | {r['params_total'] / 1e6:.3f} M (+{r['params_extra'] / 1e3:.1f} k) "
              f"| {r['step_ms']:.0f} | {r['img_per_s']:.0f} | {r['time_ratio']:.2f} "
              f"| {r['peak_rss_growth_mib']:.0f} ({r['memory_ratio']:.2f}) "
              f"| {r['saved_activations_mib']:.0f} ({r['saved_activations_mib'] / base_act:.2f}) |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
