"""Run by tests/test_data_large.py under ``torchrun --nproc-per-node 2``: both ranks open (the first one
to get the lock prepares) the same TinyImageNet store, iterate two epochs of their shard with the store
loader, and write what they really served (each sample's per-channel pixel sums and its label, in order),
which dataset positions they read, and how many images they read.

    store_rank_worker.py DATA_DIR STORE_DIR OUT_DIR

The loader flips but does not pad-crop (``crop_padding=0``): a flip only moves pixels within a channel, so a
served sample's per-channel sums identify the stored image it came from.
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
    loader = StoreLoader(splits.train, splits.info, 2, train=True, seed=7, rank=rank, world_size=world,
                         crop_padding=0)
    read_log: list[int] = []
    real_read = splits.train.read

    def logged_read(indices, out=None):
        read_log.extend(int(i) for i in indices)
        return real_read(indices, out)

    splits.train.read = logged_read
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        read_log.clear()
        sums, labels = [], []
        for x, y in loader:
            sums += x.double().sum((2, 3)).tolist()  # (B, 3): per sample, per channel
            labels += y.tolist()
        epochs.append({"sums": sums, "labels": labels, "read": list(read_log)})
    reads = splits.train.reads
    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"epochs": epochs, "reads": reads, "batches": len(loader)}, f)
    torch.set_num_threads(1)


if __name__ == "__main__":
    main()
