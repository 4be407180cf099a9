"""Every error fusionkd raises on purpose, under one root: :class:`FusionKDError`.

This module is the bottom layer: it imports nothing from fusionkd, so any module can raise any of these
without an import reaching up. Each class keeps its builtin base as well (``ConfigError`` is a
``ValueError``, ``StorageError`` an ``OSError``, ``UnknownNameError`` a ``KeyError`` ...), so code that
catches the builtin keeps working; ``except FusionKDError`` catches every refusal fusionkd makes (the CLI
turns each into one line and exit code 2). The classes are also importable from the modules that raise
them (``fusionkd.engine.config.ConfigError`` and so on).
"""

from __future__ import annotations


class FusionKDError(Exception):
    """The root of every error fusionkd raises on purpose; the message says what was wrong and what to do."""


# ------------------------------------------------------------------------------- configuration
class ConfigError(FusionKDError, ValueError):
    """A configuration that cannot run; the message says what is wrong and what is accepted."""


class UnknownNameError(FusionKDError, KeyError):
    """Raised for a name that is not registered; the message lists what is accepted."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain sentence
        return str(self.args[0])


class PluginError(ConfigError):
    """A plug-in file or entry point that cannot be used; the message says which and why."""


class TrackerError(ConfigError):
    """A tracker that cannot start (missing package, unusable store); raised before training starts."""


# ---------------------------------------------------------------------------------- run folders
class RunLockedError(ConfigError):
    """Another live process holds the run folder's lock; the message names it."""


class CompareLockedError(RunLockedError):
    """Another live ``compare`` holds the output folder; the message names it (a ConfigError: exit code 2)."""


class CheckpointError(FusionKDError, ValueError):
    """A file that is not a usable fusionkd checkpoint."""


class StorageError(FusionKDError, OSError):
    """A file of a run could not be written (disk full, read-only or permission denied); the message says
    which file, why, and that the previous version of it is intact."""

    def __str__(self) -> str:  # the sentence only, without OSError's "[Errno N] ...: 'filename'" decoration
        return str(self.strerror)


class NonFiniteLossError(FusionKDError, RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------- models and data
class WeightsError(FusionKDError, ValueError):
    """A weights file that cannot be read, or does not fit the network; the message names the keys."""


class DatasetNotFoundError(FusionKDError, FileNotFoundError):
    """The dataset's files are in none of the places searched; the message lists them and says what to do."""


class DataFormatError(FusionKDError, ValueError):
    """A data file exists but is not in the expected format (corrupt, truncated, wrong file)."""


class StoreError(DataFormatError):
    """A store folder that cannot be read: unfinished, truncated, missing a shard, corrupt."""


class StoreMismatchError(StoreError):
    """A store built from other data or at another resolution than the run asks for."""


class DownloadError(FusionKDError, RuntimeError):
    """Fetching, verifying or extracting an archive failed; the message says what to do instead."""


__all__ = [
    "CheckpointError", "CompareLockedError", "ConfigError", "DataFormatError", "DatasetNotFoundError",
    "DownloadError", "FusionKDError", "NonFiniteLossError", "PluginError", "RunLockedError", "StorageError",
    "StoreError", "StoreMismatchError", "TrackerError", "UnknownNameError", "WeightsError",
]


class RunsFailedError(FusionKDError, RuntimeError):
    """Runs that a later step needs did not finish (e.g. a published table's teachers): nothing after them ran."""
