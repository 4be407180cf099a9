"""Run by tests/test_distributed.py under ``torchrun --nproc-per-node 2`` (or 1): trains (or resumes) one tiny
run with DDP (gloo on CPU; NCCL on CUDA, from tests/test_cuda.py) and saves this rank's parameters, so the test
can compare ranks and a single process.

    ddp_worker.py SETTINGS_JSON OUT_DIR [STOP_AFTER | resume:RUN_DIR]
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fusionkd.engine.config import resolve_config
from fusionkd.engine.trainer import Trainer


def main() -> None:
    settings = json.loads(sys.argv[1])
    out = sys.argv[2]
    mode = sys.argv[3] if len(sys.argv) > 3 else ""
    if mode.startswith("resume:"):
        trainer = Trainer.resume(mode.split(":", 1)[1])
    else:
        trainer = Trainer(resolve_config(settings))
        if mode:
            trainer.stop_after = int(mode)
    result = trainer.fit()
    rank = int(os.environ["RANK"])
    params = {k: v.detach().clone() for k, v in trainer.method.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in trainer.method.named_buffers()}
    gc.collect()
    # what fit() leaves behind: a DDP wrapper or a live group would be torn down at interpreter exit,
    # where gloo can abort the process after all the work is done
    teardown = {"ddp_wrappers": sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects()),
                "group_alive": dist.is_initialized()}
    sync_bn = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.method.modules())
    torch.save({"params": params, "buffers": buffers, "summary": result.summary, "teardown": teardown,
                "sync_bn_layers": sync_bn},
               os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
