"""Throughput of the store path (``StoreLoader`` over a prepared store) against a ``torch.utils.data.DataLoader``
that reads the same JPEG files with Pillow, at 64 px (CIFAR-style pad crop + flip) and 224 px (random-resized
crop + flip, from a store prepared at 256 px; the DataLoader decodes the full JPEG and crops/resizes with
Pillow, as torchvision's ``ImageFolder`` + ``RandomResizedCrop`` would), with 1 and 2 reader threads / worker
processes. Also times ``prepare`` (decoding into the store) with 1 and 2 threads.

Usage::

    python benchmarks/store_loader.py [--n64 3000] [--n224 600] [--repeats 3] [--json out.json]

Every loader produces normalised float32 batches (128 at 64 px, 64 at 224 px), shuffled, last batch
dropped. Images/s are the median of ``--repeats`` epochs after one warm-up epoch, variants interleaved,
1 torch thread. The files are in the page cache for both (they were just written): this measures the
CPU cost of the pipelines, not the disk.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fusionkd.data import StoreLoader, load_dataset, prepare_dataset
from fusionkd.engine.trainer import cpu_name

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def write_tree(root: Path, n: int, size: tuple[int, int], classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    w, h = size
    for split, count in (("train", n), ("test", classes)):
        for k in range(count):
            c = k % classes
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
            im = Image.fromarray(base).resize((w, h), Image.BILINEAR)
            arr = np.asarray(im, np.int16) + rng.integers(-20, 21, (h, w, 3))
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"{k:06d}.jpg", quality=90)


class PILDataset(Dataset):
    """One JPEG at a time: decode with Pillow, crop/flip, to a normalised float tensor."""

    def __init__(self, files: list[tuple[Path, int]], out: int, mode: str) -> None:
        self.files, self.out, self.mode = files, out, mode
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path, label = self.files[i]
        with Image.open(path) as im:
            im = im.convert("RGB")
            if self.mode == "pad":
                arr = np.asarray(im)
                padded = np.pad(arr, ((4, 4), (4, 4), (0, 0)))
                oy, ox = random.randint(0, 8), random.randint(0, 8)
                arr = padded[oy:oy + self.out, ox:ox + self.out]
            else:  # torchvision's RandomResizedCrop.get_params + resize
                w, h = im.size
                area = w * h
                for _ in range(10):
                    ta = area * random.uniform(0.08, 1.0)
                    ar = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
                    cw, ch = int(round(math.sqrt(ta * ar))), int(round(math.sqrt(ta / ar)))
                    if 0 < cw <= w and 0 < ch <= h:
                        top, left = random.randint(0, h - ch), random.randint(0, w - cw)
                        break
                else:
                    cw, ch, top, left = min(w, h), min(w, h), (h - min(w, h)) // 2, (w - min(w, h)) // 2
                arr = np.asarray(im.resize((self.out, self.out), Image.BILINEAR, box=(left, top, left + cw, top + ch)))
        if random.random() < 0.5:
            arr = arr[:, ::-1]
        x = torch.from_numpy(np.array(arr)).permute(2, 0, 1).float().div_(255)
        return x.sub_(self.mean).div_(self.std), label


def epoch_rate(loader, epochs: list[int]) -> float:
    n, t0 = 0, time.perf_counter()
    for e in epochs:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(e)
        for x, _ in loader:
            n += x.shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n64", type=int, default=3000)
    ap.add_argument("--n224", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="fusionkd-bench-"))
    results = []
    for size, n, src_size, mode, batch in ((64, args.n64, (64, 64), "pad", 128),
                                           (224, args.n224, (400, 300), "random-resized", 64)):
        root = tmp / f"tree{size}"
        write_tree(root, n, src_size)
        for workers in (1, 2):
            t0 = time.perf_counter()
            prepare_dataset("imagefolder", root, image_size=size, crop=mode, workers=workers,
                            store_dir=str(tmp / f"store{size}-w{workers}"))
            rate = (n + 10) / (time.perf_counter() - t0)
            results.append({"size": size, "loader": "fusionkd prepare (decode into the store)",
                            "workers": workers, "img_s": rate})
            print(f"{size} px prepare, {workers} thread(s): {rate:,.0f} img/s", file=sys.stderr, flush=True)
        splits = load_dataset("imagefolder", root, image_size=size, storage="store", crop=mode,
                              store_dir=str(tmp / f"store{size}-w1"), val_fraction=0)
        files = sorted((p, int(p.parent.name[1:])) for p in (root / "train").rglob("*.jpg"))
        variants = {}
        for workers in (1, 2):
            variants[("fusionkd StoreLoader", workers)] = StoreLoader(
                splits.train, (MEAN, STD), batch, train=True, workers=workers)
            variants[("DataLoader + PIL", workers)] = DataLoader(
                PILDataset(files, size, mode), batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                persistent_workers=True)
        rates: dict = {k: [] for k in variants}
        for loader in variants.values():
            epoch_rate(loader, [0])  # warm-up (starts the DataLoader's workers)
        for r in range(args.repeats):
            for k, loader in variants.items():
                rates[k].append(epoch_rate(loader, [r + 1]))
        for (name, workers), rs in rates.items():
            results.append({"size": size, "loader": name, "workers": workers, "img_s": statistics.median(rs),
                            "runs": rs})
            print(f"{size} px {name}, {workers} worker(s): {statistics.median(rs):,.0f} img/s", file=sys.stderr,
                  flush=True)
    env = {"cpu": cpu_name(), "torch": torch.__version__, "python": platform.python_version(), "threads": 1}
    print(f"\n{env}\n")
    print("| size | loader | threads / workers | images/s |")
    print("|---|---|---:|---:|")
    for r in results:
        print(f"| {r['size']} px | {r['loader']} | {r['workers']} | {r['img_s']:,.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "results": results}, indent=1))


if __name__ == "__main__":
    main()
