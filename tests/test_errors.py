"""One root for every error fusionkd raises on purpose (``fusionkd.errors``), each keeping its builtin base,
and still importable from the modules that raise it."""

from __future__ import annotations

import pytest

import fusionkd
from fusionkd import errors
from fusionkd.cli import main

BUILTIN = {
    "ConfigError": ValueError, "UnknownNameError": KeyError, "PluginError": ValueError, "TrackerError": ValueError,
    "RunLockedError": ValueError, "CompareLockedError": ValueError, "CheckpointError": ValueError,
    "StorageError": OSError, "NonFiniteLossError": RuntimeError, "WeightsError": ValueError,
    "DatasetNotFoundError": FileNotFoundError, "DataFormatError": ValueError, "StoreError": ValueError,
    "StoreMismatchError": ValueError, "DownloadError": RuntimeError,
}
#: where each class was defined before fusionkd.errors (imports there keep working: the same object)
HOMES = {
    "ConfigError": "fusionkd.engine.config", "UnknownNameError": "fusionkd.registry",
    "PluginError": "fusionkd.plugins", "TrackerError": "fusionkd.engine.trackers",
    "RunLockedError": "fusionkd.engine.rundir", "CompareLockedError": "fusionkd.compare.grid",
    "CheckpointError": "fusionkd.engine.checkpoint", "StorageError": "fusionkd.engine.checkpoint",
    "NonFiniteLossError": "fusionkd.engine.trainer", "WeightsError": "fusionkd.models",
    "DatasetNotFoundError": "fusionkd.data", "DataFormatError": "fusionkd.data",
    "StoreError": "fusionkd.data.store", "StoreMismatchError": "fusionkd.data.store",
    "DownloadError": "fusionkd.data.download",
}


def test_every_error_has_the_root_and_its_builtin_base():
    names = [n for n in errors.__all__ if n != "FusionKDError"]
    assert sorted(names) == sorted(BUILTIN)
    for name in names:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.FusionKDError) and issubclass(cls, BUILTIN[name]), name
    assert fusionkd.FusionKDError is errors.FusionKDError


@pytest.mark.parametrize("name", sorted(HOMES))
def test_the_old_import_paths_give_the_same_class(name):
    import importlib

    assert getattr(importlib.import_module(HOMES[name]), name) is getattr(errors, name)


def test_messages_stay_plain_sentences():
    assert str(errors.UnknownNameError("unknown model 'x'")) == "unknown model 'x'"  # no KeyError quotes
    e = errors.StorageError(28, "cannot write 'last.pt': the disk is full", "last.pt")
    assert str(e) == "cannot write 'last.pt': the disk is full" and e.errno == 28


def test_the_cli_turns_any_fusionkd_error_into_one_line(capsys):
    assert main(["train", "--model", "resnet21", "--dataset", "synthetic", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fusionkd train: error: ") and "resnet20" in err and "Traceback" not in err
