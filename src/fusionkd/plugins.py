"""Plug-ins: methods, models and datasets from other packages or from a local file, without forking fusionkd.

* **Installed packages** declare Python entry points in the groups ``fusionkd.methods``, ``fusionkd.models``
  and ``fusionkd.datasets``. An entry point may name a module (importing it runs its ``@register_method`` /
  ``@register_model`` / ``@register_dataset`` decorators) or an object: a :class:`~fusionkd.methods.Method`
  subclass, or a model factory ``fn(num_classes, in_chans, **kw)``, which is registered under the entry
  point's name. Each registry loads its own group once, on its first lookup (:mod:`fusionkd.registry`);
  :func:`load_entry_points` loads them all now.
* **A local file** for one run: ``plugins=[my_method.py]`` in a config (``fusionkd train --plugin
  my_method.py``; compare and tune take ``--plugin`` too). The file is imported before the config is
  validated; its absolute path is kept in ``config.yaml``, so ``--resume`` and compare's worker processes
  load it again.

Every registry entry records where it came from (``extras["source"]``): ``fusionkd``, ``entry point
<distribution> <version> (<module:object>)`` or ``file <path>``; ``fusionkd list`` shows it. A plug-in that
fails to import is reported by ``fusionkd list`` and in the log, and never breaks the built-in names. One
that calls ``sys.exit`` (raises ``SystemExit``) while being imported is such a failure too, named as such
(a local file: :class:`PluginError`, exit code 2 in the CLI); a ``KeyboardInterrupt`` (Ctrl-C during the
import) passes through.

A run folder names its plug-in files in ``config.yaml``, and ``--resume`` imports them again: resuming a
folder made by someone else runs their code. Within :func:`importing_for` (``fusionkd train --resume``)
each file's absolute path is logged *before* it is imported (``resuming RUN imports plug-in code from PATH``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import types
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import PluginError
from .registry import ENTRY_POINT_ERRORS, ENTRY_POINT_GROUPS, exit_text, mark_new, snapshot

log = logging.getLogger("fusionkd")

GROUPS = tuple(ENTRY_POINT_GROUPS.values())
#: entry points that could not be loaded: ``(group, name, error)`` (the registries fill it)
ERRORS: list[tuple[str, str, str]] = ENTRY_POINT_ERRORS
_loaded_files: dict[str, types.ModuleType] = {}
#: set by :func:`importing_for`: why plug-in files are being imported now (announced before each import)
_purpose: str | None = None


def _registries():
    from .data import DATASETS
    from .methods import METHODS
    from .models import MODELS

    return {"fusionkd.methods": METHODS, "fusionkd.models": MODELS, "fusionkd.datasets": DATASETS}


@contextlib.contextmanager
def importing_for(purpose: str) -> Iterator[None]:
    """Within this block, :func:`load_files` logs ``"<purpose> imports plug-in code from PATH"`` (a warning)
    before it imports each file, e.g. ``importing_for("resuming runs/x")``: the person resuming someone
    else's run folder sees whose code runs before it does."""
    global _purpose
    previous, _purpose = _purpose, purpose
    try:
        yield
    finally:
        _purpose = previous


def load_entry_points(force: bool = False) -> None:
    """Import every ``fusionkd.*`` entry point of the installed distributions now (each registry does it
    by itself on its first lookup; ``force``: again)."""
    for reg in _registries().values():
        reg.discover(force)


def load_files(paths: Iterable[str | Path]) -> list[str]:
    """Import local plug-in files (each once per process); returns their absolute paths.

    Raises PluginError for a missing file, one that is not ``.py``, or one that fails to import (an
    exception, or ``sys.exit`` called at import); a ``KeyboardInterrupt`` passes through.
    """
    out = []
    for p in paths:
        path = Path(p).expanduser().resolve()
        key = str(path)
        out.append(key)
        if key in _loaded_files:
            continue
        if not path.is_file() or path.suffix != ".py":
            raise PluginError(f"plug-in {str(p)!r}: no such Python file (expected a .py file that registers "
                              "methods/models/datasets with @register_method/@register_model/@register_dataset)")
        load_entry_points()  # first: an installed plug-in keeps its names, the file's come after
        before = snapshot()
        name = f"fusionkd_plugin_{path.stem}_{abs(hash(key)) % 10**8}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        if _purpose is not None:
            log.warning("%s imports plug-in code from %s (it runs with your rights: resume only run folders "
                        "you trust)", _purpose, key)
        else:
            log.debug("importing plug-in code from %s", key)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except SystemExit as e:  # sys.exit() at import: a failure like any other, not the end of the command
            sys.modules.pop(name, None)
            raise PluginError(f"plug-in {key} failed to import: it {exit_text(e)}") from None
        except Exception as e:
            sys.modules.pop(name, None)
            raise PluginError(f"plug-in {key} failed to import: {type(e).__name__}: {e}") from e
        except BaseException:  # KeyboardInterrupt: passes through, leaving no half-imported module behind
            sys.modules.pop(name, None)
            raise
        _loaded_files[key] = module
        new = mark_new(before, f"file {key}")
        if not new:
            log.warning("plug-in %s registered nothing (use @register_method, @register_model or "
                        "@register_dataset)", key)
        else:
            log.info("plug-in %s: %s", key, ", ".join(new))
    return out
