"""Run by tests/test_distributed.py under ``torchrun --nproc-per-node 2``: trains one tiny run with DDP
(gloo on CPU) and saves this rank's parameters, so the test can compare ranks and a single process."""

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
    cfg = resolve_config(settings)
    trainer = Trainer(cfg)
    result = trainer.fit()
    rank = int(os.environ["RANK"])
    params = {k: v.detach().clone() for k, v in trainer.method.named_parameters()}
    torch.save({"params": params, "summary": result.summary}, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
