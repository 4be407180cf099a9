"""Evaluation throughput by batch size (how the default ``eval_batch_size`` was chosen).

    OMP_NUM_THREADS=1 python benchmarks/eval_batch.py [--images 4000] [--model resnet20] [--threads 1]

Evaluates ``--images`` random 1x28x28 images (Fashion-MNIST's shape) through the device loader and the
engine's ``evaluate`` at several batch sizes, fp32 and bf16 autocast (channels_last), best of 3 passes.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from fusionkd.data import DeviceLoader
from fusionkd.data.datasets import ArrayDataset, DatasetInfo
from fusionkd.engine.config import Config
from fusionkd.engine.trainer import build_method, evaluate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="64,128,256,512,1000")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randint(0, 256, (args.images, 1, 28, 28), dtype=torch.uint8, generator=g),
                        torch.randint(0, 10, (args.images,), generator=g))
    info = DatasetInfo("shape-only", [str(i) for i in range(10)], (0.5,), (0.25,), 1, 28)
    method = build_method(Config(model=args.model), info, torch.device("cpu")).to(memory_format=torch.channels_last)
    print(f"| precision | {' | '.join('batch ' + b for b in args.batches.split(','))} |")
    print("|---|" + "---:|" * len(args.batches.split(",")))
    for prec in ("fp32", "bf16"):
        cells = []
        for b in (int(x) for x in args.batches.split(",")):
            loader = DeviceLoader(data, ((0.5,), (0.25,)), b, train=False, device="cpu", channels_last=True)
            amp = torch.autocast("cpu", dtype=torch.bfloat16) if prec == "bf16" else contextlib.nullcontext()
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                evaluate(method, loader, amp)
                best = min(best, time.perf_counter() - t0)
            cells.append(f"{args.images / best:,.0f}")
        print(f"| {prec} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
