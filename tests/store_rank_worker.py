"""Run by tests/test_data_large.py under ``torchrun --nproc-per-node 2``: both ranks open (the first one
to get the lock prepares) the same TinyImageNet store, iterate two epochs of their shard with the store
loader, and write what they served and how many images they read.

    store_rank_worker.py DATA_DIR STORE_DIR OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from fusionkd.data import StoreLoader, load_dataset


def main() -> None:
    data_dir, store_dir, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    splits = load_dataset("tinyimagenet", data_dir, store_dir=store_dir, val_fraction=0.25, workers=1)
    loader = StoreLoader(splits.train, splits.info, 2, train=True, seed=7, rank=rank, world_size=world)
    served, sums = [], []
    for epoch in range(2):
        loader.set_epoch(epoch)
        served.append(loader.plan(epoch)[0].tolist())
        sums.append([float(x.double().sum()) for x, _ in loader])
    reads = splits.train.reads
    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"served": served, "reads": reads, "sums": sums, "batches": len(loader)}, f)
    torch.set_num_threads(1)


if __name__ == "__main__":
    main()
