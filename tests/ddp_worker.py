"""Run by tests/test_distributed.py under ``torchrun --nproc-per-node 2``: trains (or resumes) one tiny run
with DDP (gloo on CPU) and saves this rank's parameters, so the test can compare ranks and a single process.

    ddp_worker.py SETTINGS_JSON OUT_DIR [STOP_AFTER | resume:RUN_DIR]
"""

from __future__ import annotations

import json
import os
import sys

import torch

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
    torch.save({"params": params, "buffers": buffers, "summary": result.summary},
               os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
