"""Checkpoints: written atomically, read as data (``weights_only=True``), never as code.

A training checkpoint (``last.pt`` / ``best.pt``) is a dict of tensors and plain values:

``format``, ``version``, ``epoch`` (epochs completed), ``config`` (the resolved run config),
``data`` (dataset name, class names, input channels/size, normalisation), ``method_state``,
``optimizer``, ``scheduler``, ``scaler``, ``rng``, ``metrics`` (the epoch's metrics line), and
``deploy`` = ``{"model": zoo name, "head": head name, "state_dict": ..., "model_kwargs": {...}}``:
everything needed to rebuild the network a user keeps without any of fusionkd's training parts.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT = "fusionkd-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a usable fusionkd checkpoint."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the old file or the new one, never a truncated file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write a text file atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a fusionkd checkpoint as data only (``weights_only=True``) and check its format."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise CheckpointError(f"{str(path)!r} is a folder without best.pt or last.pt")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, truncated zip, refused globals
        raise CheckpointError(
            f"{str(p)!r} could not be read as a fusionkd checkpoint ({type(e).__name__}: {e}). "
            "Only files written by fusionkd (train/export) are accepted; they are loaded with "
            "weights_only=True, so files holding arbitrary Python objects are refused."
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (FORMAT, FORMAT + "-deploy"):
        raise CheckpointError(f"{str(p)!r} is not a fusionkd checkpoint (no 'format: {FORMAT}' entry)")
    if int(ckpt.get("version", 0)) > VERSION:
        raise CheckpointError(
            f"{str(p)!r} has format version {ckpt.get('version')}, newer than this fusionkd "
            f"(reads up to {VERSION}); upgrade fusionkd"
        )
    return ckpt


def build_deploy_model(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the deployed network from a checkpoint's ``deploy`` entry (zoo model + weights)."""
    from ..models import create_model

    dep = ckpt.get("deploy")
    data = ckpt.get("data") or {}
    if not dep or "model" not in dep or "state_dict" not in dep:
        raise CheckpointError("the checkpoint has no 'deploy' entry (model name + weights)")
    model = create_model(
        dep["model"],
        num_classes=len(data["classes"]),
        in_chans=int(data["in_chans"]),
        **dict(dep.get("model_kwargs") or {}),
    )
    missing, unexpected = model.load_state_dict(dep["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"the deploy weights do not fit a {dep['model']!r}: missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
    model.eval()
    return model


# ---------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """Every RNG the training loop may draw from, as weights_only-loadable values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
