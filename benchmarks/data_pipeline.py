"""Throughput of fusionkd's DeviceLoader against a conventional per-sample torch DataLoader.

Both produce the same training batches: random crop with 4 pixels of zero padding, horizontal flip,
normalisation, batch 128, shuffled, last incomplete batch dropped. The conventional pipeline is a
``Dataset`` whose ``__getitem__`` transforms one uint8 tensor image (pad, crop, flip, float, normalise)
and a ``DataLoader`` with ``num_workers`` 0 and 2 (persistent workers, so their start-up is not counted).

Usage::

    python benchmarks/data_pipeline.py                       # CPU, markdown table
    python benchmarks/data_pipeline.py --device cuda --json out.json

Images/s are the median over ``--repeats`` runs of ``--epochs`` epochs each, after one warm-up epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from fusionkd.data import ArrayDataset, DeviceLoader

MEAN_STD = {1: ((0.2860,), (0.3530,)), 3: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}


class PerSampleDataset(Dataset):
    """The conventional pipeline: one image at a time, torchvision-style transforms on tensors."""

    def __init__(self, data: ArrayDataset, mean: tuple[float, ...], std: tuple[float, ...], padding: int = 4):
        self.images = data.images
        self.labels = data.labels
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.padding = padding

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.images[i]  # uint8 (C, H, W)
        _, h, w = img.shape
        p = self.padding
        padded = F.pad(img, (p, p, p, p))
        oy, ox = torch.randint(0, 2 * p + 1, (2,)).tolist()
        img = padded[:, oy:oy + h, ox:ox + w]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        img = img.float().div_(255).sub_(self.mean).div_(self.std)
        return img, self.labels[i]


def synthetic(n: int, shape: tuple[int, int, int], num_classes: int = 10) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    return ArrayDataset(torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g),
                        torch.randint(0, num_classes, (n,), generator=g))


def consume(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> int:
    """Pull every batch onto ``device`` (as a training step would) and count the images."""
    n = 0
    checksum = torch.zeros((), device=device)
    for x, y in batches:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        checksum += x[:, 0, 0, 0].sum() + y[0]  # touch the batch without a host sync
        n += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n


def measure(make_epoch: Callable[[int], Iterable], device: torch.device, epochs: int, repeats: int) -> float:
    """Median images/s over ``repeats`` runs of ``epochs`` epochs, after one warm-up epoch."""
    consume(make_epoch(0), device)
    rates = []
    for r in range(repeats):
        t0 = time.perf_counter()
        n = sum(consume(make_epoch(1 + r * epochs + e), device) for e in range(epochs))
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def bench_device_loader(data: ArrayDataset, device: torch.device, batch_size: int, epochs: int, repeats: int,
                        **kwargs) -> float:
    mean, std = MEAN_STD[data.images.shape[1]]
    loader = DeviceLoader(data, (mean, std), batch_size, train=True, device=device, **kwargs)

    def epoch(e: int):
        loader.set_epoch(e)
        return loader

    return measure(epoch, device, epochs, repeats)


def bench_dataloader(data: ArrayDataset, device: torch.device, batch_size: int, epochs: int, repeats: int,
                     workers: int) -> float:
    mean, std = MEAN_STD[data.images.shape[1]]
    loader = DataLoader(PerSampleDataset(data, mean, std), batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    return measure(lambda e: loader, device, epochs, repeats)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--images", type=int, default=10_000, help="images per dataset (default 10000)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per repeat (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats; the median is reported (default 3)")
    ap.add_argument("--workers", default="0,2", help="DataLoader num_workers values (default 0,2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available on this machine")
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    shapes = {"CIFAR-sized 3x32x32": (3, 32, 32), "Fashion-MNIST-sized 1x28x28": (1, 28, 28)}
    rows = []
    for data_name, shape in shapes.items():
        data = synthetic(args.images, shape)
        common = (data, device, args.batch_size, args.epochs, args.repeats)
        results = [("torch DataLoader, per-sample", f"num_workers={w}", bench_dataloader(*common, workers=w))
                   for w in workers]
        results.append(("fusionkd DeviceLoader", "crop+flip", bench_device_loader(*common)))
        results.append(("fusionkd DeviceLoader", "crop+flip+cutout 8", bench_device_loader(*common, cutout=8)))
        base = results[0][2]
        for loader, variant, rate in results:
            rows.append({"data": data_name, "loader": loader, "variant": variant, "images_per_s": round(rate),
                         "speedup": round(rate / base, 1)})

    hardware = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": args.threads,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(f"{hardware['cpu']}, {hardware['cores']} cores, torch {hardware['torch']}, {args.threads} thread(s), "
          f"device {hardware['device']}; batch {args.batch_size}, {args.images} images, median of "
          f"{args.repeats} x {args.epochs} epochs")
    print()
    print("| data | loader | variant | images/s | vs DataLoader(0 workers) |")
    print("|---|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['data']} | {r['loader']} | {r['variant']} | {r['images_per_s']:,} | {r['speedup']}x |")
    result = {"hardware": hardware, "settings": vars(args), "results": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
