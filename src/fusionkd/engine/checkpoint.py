"""Checkpoints: written atomically, read as data (``weights_only=True``), never as code.

A training checkpoint (``last.pt`` / ``best.pt``) is a dict of tensors and plain values:

``format``, ``version``, ``epoch`` (epochs completed), ``config`` (the resolved run config),
``data`` (dataset name, class names, input channels/size, normalisation), ``method_state``,
``optimizer``, ``scheduler``, ``scaler``, ``rng``, ``metrics`` (the epoch's metrics line), and
``deploy`` = ``{"model": zoo name, "head": head name, "state_dict": ..., "model_kwargs": {...}}``:
everything needed to rebuild the network a user keeps without any of fusionkd's training parts.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, StorageError

FORMAT = "fusionkd-checkpoint"
VERSION = 1


_WRITE_HINT = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def storage_error(path: Path, err: BaseException, what: str = "write") -> StorageError:
    """A :class:`StorageError` for ``err`` raised while writing ``path``, saying why in words."""
    code = getattr(err, "errno", None)
    reason = _WRITE_HINT.get(code) or (os.strerror(code) if code else f"{type(err).__name__}: {err}")
    if code in (errno.ENOSPC, errno.EDQUOT):
        with contextlib.suppress(OSError):
            existing = next(p for p in (path, *path.parents) if p.exists())
            reason += f" ({shutil.disk_usage(existing).free / 2**20:,.1f} MiB free there)"
    todo = ("free some space" if code in (errno.ENOSPC, errno.EDQUOT) else
            "choose a writable out_dir= or fix the permissions" if code in (errno.EROFS, errno.EACCES, errno.EPERM)
            else "fix the cause")
    e = StorageError(code or errno.EIO, f"cannot {what} {str(path)!r}: {reason}. Nothing already written was "
                     f"damaged (files are replaced only once the new version is complete); {todo}, then run the "
                     "same command again (or --resume the run)")
    e.filename = str(path)
    return e


class _Tracking:
    """A binary file wrapper that remembers the first OSError of a ``write`` (``torch.save`` reports a
    failed write only as a RuntimeError of its zip writer)."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return _raw_write(self.f, data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def _raw_write(f: Any, data: Any) -> int:
    """The one place bytes of a run's files reach the disk (fault-injection tests replace it)."""
    return f.write(data)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: str | Path, fill: Callable[[_Tracking], None]) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise storage_error(path, e) from e
    tracked = None
    try:
        with os.fdopen(fd, "wb") as f:
            tracked = _Tracking(f)
            fill(tracked)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise storage_error(path, e) from e
        if tracked is not None and tracked.error is not None:  # torch.save's RuntimeError hides the OSError
            raise storage_error(path, tracked.error) from e
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the old file or the new one, never a truncated file; a failed
    write (disk full, read-only, permissions) raises :class:`StorageError` and leaves the old file intact.
    """
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write a text file atomically (temp file + fsync + rename); errors as in :func:`atomic_save`."""
    _atomic_write(path, lambda f: f.write(text.encode()))


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Copy ``src`` over ``dst`` atomically (``dst`` is either the old file or a complete copy)."""
    def fill(f: _Tracking) -> None:
        with open(src, "rb") as r:
            while chunk := r.read(1 << 22):
                f.write(chunk)

    _atomic_write(dst, fill)


def read_checkpoint_file(p: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """One checkpoint file exactly as written (no best.pt/last.pt redirection), read as data and checked."""
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
    check_fields(ckpt, p)
    return ckpt


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_fields(ckpt: dict[str, Any], source: str | Path) -> None:
    """Raise :class:`CheckpointError` naming the first field of ``ckpt`` that has the wrong type or an
    impossible value (so that nothing later fails with a bare ``int()`` or ``KeyError``)."""
    where = repr(str(source))

    def bad(field: str, value: Any, expected: str) -> CheckpointError:
        return CheckpointError(f"{where}: field {field!r} is {value!r:.80}, expected {expected}; the file is "
                               "damaged or was not written by fusionkd")

    version = ckpt.get("version", 0)
    if not _is_int(version) or version < 0:
        raise bad("version", version, "a non-negative integer")
    if version > VERSION:
        raise CheckpointError(f"{where} has format version {version}, newer than this fusionkd (reads up to "
                              f"{VERSION}); upgrade fusionkd")
    epoch = ckpt.get("epoch")
    if epoch is not None and (not _is_int(epoch) or epoch < 0):
        raise bad("epoch", epoch, "a non-negative integer (epochs completed)")
    for key in ("config", "metrics", "rng", "teacher"):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], dict):
            raise bad(key, ckpt[key], "a mapping")
    data = ckpt.get("data")
    if not isinstance(data, dict):
        raise bad("data", data, "a mapping with name, classes, in_chans, image_size, mean, std")
    if not isinstance(data.get("classes"), list) or not data["classes"]:
        raise bad("data.classes", data.get("classes"), "a non-empty list of class names")
    for key in ("in_chans", "image_size"):
        if not _is_int(data.get(key)) or data[key] < 1:
            raise bad(f"data.{key}", data.get(key), "a positive integer")
    for key in ("mean", "std"):
        v = data.get(key)
        if v is not None and (not isinstance(v, list) or not all(isinstance(x, (int, float)) for x in v)):
            raise bad(f"data.{key}", v, "a list of numbers")
        if v is not None and not all(math.isfinite(x) for x in v):
            raise bad(f"data.{key}", v, "finite numbers (NaN/inf normalisation would turn every input into NaN)")
    dep = ckpt.get("deploy")
    if dep is not None:
        if not isinstance(dep, dict) or not isinstance(dep.get("model"), str):
            raise bad("deploy.model", dep.get("model") if isinstance(dep, dict) else dep, "a model name")
        sd = dep.get("state_dict")
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise bad("deploy.state_dict", type(sd).__name__, "a mapping of names to tensors")
    best = ckpt.get("best")
    if best is not None and (not isinstance(best, dict) or not _is_int(best.get("epoch"))):
        raise bad("best", best, "a mapping with an integer 'epoch'")
    if ckpt.get("format") == FORMAT and ckpt.get("method_state") is not None:
        if not isinstance(ckpt["method_state"], dict):
            raise bad("method_state", type(ckpt["method_state"]).__name__, "a state_dict")
        if epoch is None:
            raise bad("epoch", None, "a non-negative integer (epochs completed)")
    from ..models.weights import nonfinite_tensors

    states = (("deploy.state_dict", (dep or {}).get("state_dict")), ("method_state", ckpt.get("method_state")))
    for field, state in states:
        nonfinite = nonfinite_tensors(state) if isinstance(state, dict) else []
        if nonfinite:
            raise CheckpointError(
                f"{where}: {field} holds non-finite values (NaN or inf) in {len(nonfinite)} tensor(s): "
                f"{', '.join(nonfinite[:6])}{' ...' if len(nonfinite) > 6 else ''}. fusionkd never saves such "
                "weights (its NaN guard stops a run first), so the file was altered or damaged")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a fusionkd checkpoint as data only (``weights_only=True``) and check its format and fields.

    A run folder gives its ``best.pt`` (else ``last.pt``). Reading a run's ``best.pt`` always gives the
    epoch that the run's ``last.pt`` records as best: the engine writes ``last.pt`` first and ``best.pt``
    second, so after a stop between the two writes the best epoch is the one ``last.pt`` holds, and that is
    what is returned (the next start of the run rewrites ``best.pt``).
    """
    p = Path(path)
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise CheckpointError(f"{str(path)!r} is a folder without best.pt or last.pt")
    if not p.is_file() and p.name == "best.pt" and (p.parent / "last.pt").is_file():
        # the window of epoch 1 (or of a best.pt deleted by a stop): last.pt is written first; when it records
        # its own epoch as the best one, it *is* best.pt's content
        last = read_checkpoint_file(p.parent / "last.pt", map_location)
        if best_is_last(last):
            return last
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist, and {p.parent / 'last.pt'} (epoch "
                              f"{last.get('epoch')}) does not record its own epoch as the best one")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    ckpt = read_checkpoint_file(p, map_location)
    if p.name == "best.pt" and (p.parent / "last.pt").is_file():
        with contextlib.suppress(CheckpointError):
            last = read_checkpoint_file(p.parent / "last.pt", map_location)
            if best_is_last(last) and last.get("epoch") != ckpt.get("epoch") \
                    and last.get("config") == ckpt.get("config"):
                return last
    return ckpt


def best_is_last(last: dict[str, Any]) -> bool:
    """Whether the run's ``last.pt`` records its own epoch as the best one."""
    best = last.get("best") or {}
    return best.get("epoch") is not None and best.get("epoch") == last.get("epoch")


def build_deploy_model(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the deployed network from a checkpoint's ``deploy`` entry (zoo model + weights)."""
    from ..models import create_model
    from ..registry import UnknownNameError

    dep = ckpt.get("deploy")
    data = ckpt.get("data") or {}
    if not dep or "model" not in dep or "state_dict" not in dep:
        raise CheckpointError("the checkpoint has no 'deploy' entry (model name + weights)")
    try:
        model = create_model(dep["model"], num_classes=len(data["classes"]), in_chans=int(data["in_chans"]),
                             **dict(dep.get("model_kwargs") or {}))
    except UnknownNameError as e:
        hint = (f" (a user module: register it again first, fusionkd.models.register_module(module, "
                f"name={dep['model']!r}))" if str(dep["model"]).startswith("user-") else "")
        raise CheckpointError(f"the checkpoint's deployed network: {e}{hint}") from None
    load_weights_strict(model, dep["state_dict"], f"a {dep['model']!r} for {len(data['classes'])} classes and "
                        f"{data['in_chans']} input channels (as the checkpoint's metadata says)")
    model.eval()
    return model


def load_weights_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(state)`` that names every missing, unexpected and mis-shaped key in a
    :class:`CheckpointError` instead of raising PyTorch's RuntimeError."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} in the file vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def show(xs: list[str]) -> str:
            return ", ".join(xs[:6]) + (f" (+{len(xs) - 6} more)" if len(xs) > 6 else "")

        parts = [f"missing {show(missing)}" if missing else "", f"unexpected {show(unexpected)}" if unexpected
                 else "", f"shape mismatch {show(shapes)}" if shapes else ""]
        raise CheckpointError(f"the weights do not fit {what}: " + "; ".join(p for p in parts if p))
    module.load_state_dict(state)


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
