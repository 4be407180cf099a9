"""Training-step throughput of the online methods, sequential vs batched (vmap) peers.

Times one full training step (``training_step`` + backward + SGD step) of ``baseline``, ``dml``,
``one``, ``ffl_s``, ``ffl`` and ``mfef`` on random ``(B, C, S, S)`` images, every configuration in turn
within each round (interleaved, so that load from other processes spreads over all of them), and reports
the median step time and images per second. Each online method is measured twice: its peers run one
after another (``batched_peers=false``) and as one ``torch.func.vmap`` computation (``true``).

Example (the numbers in docs/methods/online.md)::

    python benchmarks/online_peers.py --threads 1 --batch 128 --rounds 12
    python benchmarks/online_peers.py --threads 1 --batch 128 --rounds 12 --precision bf16 --channels-last
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time

import torch

from fusionkd.engine.trainer import cpu_name
from fusionkd.methods import METHODS, Method, MethodContext

ONLINE = ("dml", "one", "ffl_s", "ffl", "mfef")


def build(name: str, ctx: MethodContext, batched: bool | None, channels_last: bool) -> Method:
    cls = METHODS.get(name)
    options = cls.Options() if batched is None else dataclasses.replace(cls.Options(), batched_peers=batched)
    method = cls(ctx, options)
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    return method.train()


def make_step(method: Method, images: torch.Tensor, labels: torch.Tensor, precision: str):
    optimizer = torch.optim.SGD(method.param_groups(5e-4), lr=0.01, momentum=0.9)
    amp = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())

    def step() -> None:
        with amp:
            terms = method.training_step(images, labels, 5)
        loss = sum(v.float() for v in terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=12, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--methods", default="baseline," + ",".join(ONLINE))
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ctx = MethodContext(model=args.model, num_classes=10, in_chans=args.in_chans, image_size=args.image_size,
                        epochs=30)
    images = torch.randn(args.batch, args.in_chans, args.image_size, args.image_size)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch,))

    configs: dict[str, object] = {}
    for name in args.methods.split(","):
        variants = [None] if name == "baseline" else [False, True]
        for batched in variants:
            label = name if batched is None else f"{name} ({'batched' if batched else 'sequential'})"
            method = build(name, ctx, batched, args.channels_last)
            configs[label] = make_step(method, images, labels, args.precision)

    times: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(args.warmup + args.rounds):
        for label, step in configs.items():
            t0 = time.perf_counter()
            step()
            if r >= args.warmup:
                times[label].append(time.perf_counter() - t0)

    print(f"# {args.model} {args.in_chans}x{args.image_size}x{args.image_size}, batch {args.batch}, "
          f"{args.precision}{', channels_last' if args.channels_last else ''}, {args.threads} thread(s), "
          f"torch {torch.__version__}, {cpu_name()}; median of {args.rounds} interleaved steps")
    print("| configuration | step (s) | img/s |")
    print("|---|---:|---:|")
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"| {label} | {med:.3f} | {args.batch / med:.0f} |")


if __name__ == "__main__":
    main()
