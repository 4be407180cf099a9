"""What the large datasets in their official layouts (:mod:`.tinyimagenet`, :mod:`.cub200`, :mod:`.imagenet`)
share: finding their root folder and reading it into memory or a store.

By default these datasets are read from a store (``storage="store"``): decoded once into raw uint8
shards at a fixed resolution (``fusionkd prepare``, or automatically by the first ``train``), then read
batch by batch. ``storage="memory"`` decodes them into memory instead (cached as ``.npy``, pad crop only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from ...errors import DatasetNotFoundError
from ..containers import SourceSplits, StoreSource
from ..formats import DataFormatError
from .base import LoadRequest, candidate_dirs, format_searched
from .storage import StoreOptions, materialise, open_store_source

logger = logging.getLogger(__name__)


def find_root(req: LoadRequest, test, what: str, fix: str) -> Path:
    searched = candidate_dirs(req)
    for c in searched:
        root = test(c)
        if root is not None:
            return root
    raise DatasetNotFoundError(f"{req.name} not found ({what}). Searched:\n{format_searched(searched)}\n{fix}"
                               + (f" Automatic download is not supported for {req.name}." if req.download else ""))


def load_official(req: LoadRequest, opts: StoreOptions, default_size: int, locate, what: str, fix: str, reader,
              official_classes: int, mean=None, std=None) -> SourceSplits | StoreSource:
    opts.check(req.name)
    try:
        root = find_root(req, locate, what, fix)
    except DatasetNotFoundError:
        stored = open_store_source(req, opts, default_size)
        if stored is not None:
            return stored
        raise
    files = reader(root)
    if len(files.classes) < 2:
        raise DataFormatError(f"{root}: {len(files.classes)} class ({files.classes!r}); a classifier needs at least "
                              "two classes")
    if len(files.classes) != official_classes:
        logger.warning("%s at %s has %d classes (the official set has %d)", req.name, root, len(files.classes),
                       official_classes)
    return materialise(req, files, opts, default_size, mean=mean, std=std)


def root_finder(folder: str, marker_file: str, marker_dir: str) -> Callable[[Path], Path | None]:
    """A finder of the dataset root in a candidate folder ``c``: ``c/folder`` or ``c`` itself, whichever
    holds ``marker_file`` and the folder ``marker_dir``."""

    def find(c: Path) -> Path | None:
        for root in (c / folder, c):
            if (root / marker_file).is_file() and (root / marker_dir).is_dir():
                return root
        return None

    return find
