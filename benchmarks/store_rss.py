"""Peak resident memory of ``fusionkd train`` reading a store, for two store sizes, under a memory cap.

Builds an image folder of ``--images`` ``--store-size`` px JPEGs (hard links to ``--base`` distinct files, so writing it
is quick; every link is a file of its own to fusionkd), prepares it into a store (``--store-size`` px, random-resized
crop served at ``--out`` px), then trains ResNet-20 for one epoch over every training image, in a child
process, once on a store of ``--small`` images and once on the full one. When the cgroup-v1 memory
controller is writable (root in a container) each child runs in a fresh cgroup whose limit is ``--cap-mb``
(page cache included: the kernel must evict the store's pages to stay under it); otherwise the children
run uncapped. Before each training run the store's pages are dropped from the page cache
(``posix_fadvise(DONTNEED)`` on its shards only), so the child reads them from disk and they are charged to
its cgroup. Each child prints its peak RSS (``getrusage`` ``ru_maxrss``); the table adds the cgroup's peak
usage and how often it hit the limit. A last child loads the same large image folder the in-memory way
(``storage="memory"``) under the same cap, for contrast.

Usage::

    python benchmarks/store_rss.py [--images 40000] [--small 10000] [--store-size 128] [--cap-mb 500] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fusionkd.data import prepare_dataset

CGROUP = Path("/sys/fs/cgroup/memory")

MEMORY_CHILD = r"""
import resource, sys, time
from fusionkd.data import load_dataset
t0 = time.perf_counter()
s = load_dataset("imagefolder", sys.argv[1], image_size=int(sys.argv[2]), cache_dir=sys.argv[3], val_fraction=0)
print("RESULT", 0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - t0, flush=True)
"""

CHILD = r"""
import resource, sys, time
from fusionkd.cli import main
t0 = time.perf_counter()
rc = main(sys.argv[1:])
print("RESULT", rc, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - t0, flush=True)
"""


def write_tree(root: Path, n: int, base: int, size: int, test: int = 200, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    src = root.parent / f"base{size}"
    if not src.is_dir():
        src.mkdir(parents=True)
        for k in range(base + test):
            pattern = np.random.default_rng([k % classes]).integers(0, 256, (4, 4, 3), dtype=np.uint8)
            im = np.asarray(Image.fromarray(pattern).resize((size, size), Image.BILINEAR), np.int16)
            im = im + rng.integers(-30, 31, im.shape)
            Image.fromarray(im.clip(0, 255).astype(np.uint8)).save(src / f"{k}.jpg", quality=90)
    for split, count, offset in (("train", n, 0), ("test", test, base)):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            k = offset + (i % (base if split == "train" else test))
            os.link(src / f"{k}.jpg", root / split / f"c{k % classes}" / f"{i:07d}.jpg")


def drop_from_page_cache(store: Path) -> None:
    for p in store.glob("*.u8"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_child(args: list[str], cap: int | None, code: str = CHILD) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    group = None
    if cap is not None:
        group = CGROUP / f"fusionkd-bench-{os.getpid()}-{time.monotonic_ns()}"
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(cap))
        (group / "memory.swappiness").write_text("0")

    def enter() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          preexec_fn=enter)
    out: dict = {"returncode": proc.returncode}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            _, rc, rss, secs = line.split()
            out.update(rc=int(rc), peak_rss_mb=int(rss) / 1024, seconds=float(secs))
    if "rc" not in out:
        out["stderr"] = proc.stderr[-2000:]
    if group is not None:
        out["cgroup_peak_mb"] = int((group / "memory.max_usage_in_bytes").read_text()) / 2**20
        out["cgroup_limit_hits"] = int((group / "memory.failcnt").read_text())
        group.rmdir()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=40_000)
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--store-size", type=int, default=128)
    ap.add_argument("--base", type=int, default=500)
    ap.add_argument("--out", type=int, default=16, help="served (training) size")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--cap-mb", type=int, default=500)
    ap.add_argument("--workdir")
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fusionkd-rss-"))
    capped = os.access(CGROUP, os.W_OK)
    cap = args.cap_mb * 2**20 if capped else None
    rows = []
    for n in (args.small, args.images):
        root = work / f"tree{n}"
        if not root.is_dir():
            write_tree(root, n, args.base, args.store_size)
        store = work / f"store{n}"
        t0 = time.perf_counter()
        prepare_dataset("imagefolder", root, image_size=args.out, store_size=args.store_size, crop="random-resized",
                        workers=2, store_dir=str(store))
        prep = time.perf_counter() - t0
        size_mb = sum(p.stat().st_size for p in store.glob("*.u8")) / 2**20
        train = ["train", "--dataset", "imagefolder", "--model", "resnet20", "--epochs", "1", "--batch-size",
                 str(args.batch), "--eval-batch-size", "512", "--image-size", str(args.out), "--progress", "none",
                 "--threads", "1", "--out-dir", str(work / "runs"), "--name", f"n{n}", "--overwrite",
                 f"data_dir={root}", f"dataset_options.store_dir={store}", "dataset_options.storage=store",
                 "dataset_options.crop=random-resized", f"dataset_options.store_size={args.store_size}",
                 "dataset_options.workers=2", "val_fraction=0"]
        drop_from_page_cache(store)
        res = run_child(train, cap)
        row = {"images": n, "store_mb": size_mb, "cap_mb": args.cap_mb if capped else None, "prepare_s": prep, **res}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    mem = run_child([str(work / f"tree{args.images}"), str(args.store_size), str(work / "npy")], cap, MEMORY_CHILD)
    mem_row = {"images": args.images, "storage": "memory", "cap_mb": args.cap_mb if capped else None, **mem}
    rows.append(mem_row)
    print(json.dumps(mem_row), file=sys.stderr, flush=True)
    print("| train images | store size | memory cap | peak RSS (ru_maxrss) | cgroup peak (incl. page cache) "
          "| run time (1 epoch + test) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r.get("storage") == "memory":
            outcome = ("killed by the memory cap (SIGKILL)" if r["returncode"] == -9 else
                       f"exit {r['returncode']}, peak RSS {r.get('peak_rss_mb', float('nan')):,.0f} MB")
            hits = f", {r['cgroup_limit_hits']} limit hits" if "cgroup_limit_hits" in r else ""
            print(f"| {r['images']:,} | in memory (`storage=memory`, {args.store_size} px) | {r['cap_mb']} MB | "
                  f"{outcome}{hits} | | |")
            continue
        cap_s = f"{r['cap_mb']} MB" if r["cap_mb"] else "none"
        cg = f"{r['cgroup_peak_mb']:.0f} MB ({r['cgroup_limit_hits']} limit hits)" if "cgroup_peak_mb" in r else "-"
        print(f"| {r['images']:,} | {r['store_mb']:,.0f} MB | {cap_s} | {r.get('peak_rss_mb', float('nan')):,.0f} MB "
              f"| {cg} | {r.get('seconds', float('nan')):.0f} s |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
