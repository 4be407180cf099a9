"""Training throughput (img/s) of the ImageNet-family zoo networks on this machine.

One full training step per measurement: forward, cross-entropy, backward, SGD step (fp32, NCHW), random
inputs of ``3 x S x S`` and 1000 classes, ``--threads`` torch threads (1 by default: stable timings on the
shared development machines, see shared/ENVIRONMENT.md). After ``--warmup`` steps, ``--steps`` steps are
timed one by one and the median is reported.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/imagenet_models.py            # 64 and 224 px
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/imagenet_models.py --sizes 64 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fusionkd.engine.trainer import cpu_name
from fusionkd.models import create_model

NAMES = ["imagenet_resnet18", "imagenet_resnet34", "imagenet_resnet50", "imagenet_mobilenet_v2"]


def step_times(name: str, size: int, batch: int, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process-CPU seconds of each timed step (CPU time shows what a dedicated core would do
    when other processes share the machine)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=1000, in_chans=3).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    times, cpu = [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return times, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="batch per size (default 32 at <= 64 px, 8 above)")
    p.add_argument("--models", nargs="+", default=NAMES)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    if a.steps < 1 or a.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    torch.set_num_threads(a.threads)
    batches = a.batch or [32 if s <= 64 else 8 for s in a.sizes]
    if len(batches) != len(a.sizes):
        p.error("give one --batch per --sizes entry")
    print(f"# {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), fp32, "
          f"warmup {a.warmup}, median of {a.steps} steps; img/s by wall clock (by process CPU time)")
    print("| network | params | " + " | ".join(f"{s} px (batch {b})" for s, b in zip(a.sizes, batches)) + " |")
    print("|---|---:|" + "---:|" * len(a.sizes))
    for name in a.models:
        n = sum(q.numel() for q in create_model(name, num_classes=1000).parameters())
        cells = []
        for size, batch in zip(a.sizes, batches):
            wall, cpu = step_times(name, size, batch, a.warmup, a.steps)
            per_thread = statistics.median(cpu) / torch.get_num_threads()
            cells.append(f"{batch / statistics.median(wall):,.1f} ({batch / per_thread:,.1f})")
        print(f"| `{name}` | {n / 1e6:.2f} M | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
