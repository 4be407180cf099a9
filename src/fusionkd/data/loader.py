"""The in-memory batch loader's old home: :class:`DeviceLoader` and its augmentation now live in
:mod:`fusionkd.data.loaders` (``device``, ``augment``, ``sharding``); every name is importable from here too."""

from .loaders import *  # noqa: F403  (the old import path: the same objects)
from .loaders import __all__  # noqa: F401
