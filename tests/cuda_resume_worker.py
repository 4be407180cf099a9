"""Run by tests/test_cuda.py::test_exact_resume_under_deterministic_settings in a process of its own: trains one
tiny run uninterrupted (``full``) and the same run stopped after epoch 1 and resumed (``part``), with PyTorch's
determinism settings switched on before CUDA initialises, and saves both runs' final parameters and buffers.

    cuda_resume_worker.py SETTINGS_JSON OUT_FILE

A process of its own because the settings are process-wide and must come first: cuBLAS reads
``CUBLAS_WORKSPACE_CONFIG`` when it creates its handle, and the determinism flags would otherwise leak into
every test after this one.
"""

from __future__ import annotations

import os

# before torch (and so before CUDA and cuBLAS) initialise: deterministic cuBLAS needs a fixed workspace
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import json  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

CUDA_INITIALISED_BEFORE = torch.cuda.is_initialized()
# warn_only: an op with no deterministic kernel warns (recorded below and shown by the test when the runs differ)
# instead of stopping the run, so the GPU check still returns whether resume was exact
torch.use_deterministic_algorithms(True, warn_only=True)
torch.backends.cudnn.deterministic = True
torch.backends.cudnn.benchmark = False

from fusionkd.engine.config import resolve_config  # noqa: E402
from fusionkd.engine.trainer import Trainer  # noqa: E402


def _state(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    assert trainer.method is not None
    return {"params": {k: v.detach().cpu().clone() for k, v in trainer.method.named_parameters()},
            "buffers": {k: v.detach().cpu().clone() for k, v in trainer.method.named_buffers()},
            "device": str(next(trainer.method.parameters()).device)}


def main() -> None:
    settings = json.loads(sys.argv[1])
    out = Path(sys.argv[2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = Trainer(resolve_config({**settings, "name": "full"}))
        full_result = full.fit()
        part = Trainer(resolve_config({**settings, "name": "part"}))
        part.stop_after = 1
        part.fit()
        stopped_at = int(torch.load(part.run_dir / "last.pt", map_location="cpu", weights_only=True)["epoch"])
        resumed = Trainer.resume(part.run_dir)
        resumed_result = resumed.fit()
    alerts = sorted({str(w.message) for w in caught if "determinis" in str(w.message).lower()})
    for a in alerts:
        print("nondeterminism alert:", a, flush=True)
    torch.save({"full": _state(full), "resumed": _state(resumed), "stopped_at": stopped_at,
                "summaries": [full_result.summary, resumed_result.summary], "alerts": alerts,
                "cuda_initialised_before_settings": CUDA_INITIALISED_BEFORE,
                "deterministic": torch.are_deterministic_algorithms_enabled()}, out)


if __name__ == "__main__":
    main()
