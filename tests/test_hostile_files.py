"""Hostile or odd files in the data (issue #23): each is made for real by the test (a decompression-bomb PNG, a
self-referencing symbolic link, a named pipe, an unreadable class folder, a damaged store manifest, a one-class
folder) and must give a one-line refusal that names the file, with no run folder left behind.

Anything that could block (a named pipe opened for reading) or needs another user (an unreadable folder, which
root reads anyway) runs in a forked child with a deadline; when the tests run as root that child drops to the
unprivileged user ``nobody`` (uid 65534) before it reads anything.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_data_datasets import write_png_tree

import fusionkd
from fusionkd.cli import main
from fusionkd.data import DataFormatError, load_dataset
from fusionkd.data.formats import MAX_PIXELS_ENV, decode_image, max_image_pixels, open_image
from fusionkd.data.official import prepare_dataset
from fusionkd.data.store import Store, StoreError

NOBODY = 65534
#: a tiny imagefolder run: 8 px images, one epoch, batches of 4
TINY = ["method=baseline", "model=resnet20", "dataset=imagefolder", "image_size=8", "batch_size=4",
        "eval_batch_size=8", "epochs=1", "threads=1", "progress=none", "val_fraction=0"]


# ---------------------------------------------------------------------------------------------- helpers
def tree(root: Path, classes: tuple[str, ...] = ("a", "b")) -> Path:
    """``root/{train,test}/<class>/*.png``: 4 train and 2 test 8x8 RGB images per class."""
    write_png_tree(root, {"train": 4, "test": 2}, list(classes), size=(8, 8))
    return root


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", *TINY, f"data_dir={data}", f"out_dir={out}", "name=run", *extra]


def cli(args: list[str], capsys) -> tuple[int, str]:
    """``fusionkd ARGS`` in this process: exit code and stderr."""
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err


def refused(code: int, err: str, *names: str) -> None:
    """A one-line refusal (exit 2, no traceback) whose message names every one of ``names``."""
    assert code == 2, err
    assert "Traceback" not in err, err
    line = next((x for x in err.splitlines() if x.startswith("fusionkd ")), "")
    assert ": error: " in line, err
    for name in names:
        assert name in line, (name, err)


def forked(fn: Callable[[], Any], *, timeout: float = 60, user: int | None = None) -> Any:
    """``fn()`` in a forked child (as ``user`` when given), killed after ``timeout`` s: a regression that blocks
    (on a named pipe) fails this test instead of hanging the suite. Returns what ``fn`` returned (JSON)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(r)
            if user is not None:
                os.setgroups([])
                os.setgid(user)
                os.setuid(user)
            payload = {"result": fn()}
            status = 0
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            payload = {"crash": f"{type(e).__name__}: {e}"}
        finally:
            with contextlib.suppress(BaseException):
                os.write(w, json.dumps(payload).encode()[:60000])
            os._exit(status)
    os.close(w)
    deadline = time.monotonic() + timeout
    while True:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            pytest.fail(f"the child was still running after {timeout}s: something blocked (a named pipe opened?)")
        time.sleep(0.02)
    with os.fdopen(r, "rb") as f:
        out = json.loads(f.read() or b'{"crash": "no answer"}')
    assert "crash" not in out, out["crash"]
    return out["result"]


def cli_in_child(args: list[str], **kw) -> tuple[int, str]:
    """``fusionkd ARGS`` in a forked child (see :func:`forked`): exit code and stderr."""

    def run() -> list:
        err = io.StringIO()
        saved, sys.stderr = sys.stderr, err
        try:
            code = main(args)
        finally:
            sys.stderr = saved
        return [code, err.getvalue()[-20000:]]

    code, err = forked(run, **kw)
    return code, err


@pytest.fixture
def shared_tmp():
    """A temporary folder every user may enter (pytest's own are root-only 0700): for the child that runs as
    ``nobody``."""
    d = Path(tempfile.mkdtemp(prefix="fusionkd-hostile-"))
    d.chmod(0o755)
    yield d
    for p in [d, *d.rglob("*")]:  # give every folder back its permissions so that it can be removed
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(d)


def bomb(path: Path, side: int = 30000) -> Path:
    """A real decompression bomb: a ``side`` x ``side`` 1-bit PNG (900 M pixels for 30000) of about 110 kB."""
    Image.new("1", (side, side)).save(path, optimize=True)
    return path


# -------------------------------------------------------------------------------- 1. decompression bomb
def test_a_decompression_bomb_in_an_image_folder_is_refused(tmp_path, capsys):
    data = tree(tmp_path / "imgs")
    big = bomb(data / "train" / "a" / "bomb.png")
    assert big.stat().st_size < 200_000  # small on disk, 900,000,000 pixels inside
    limit = max_image_pixels()
    with pytest.raises(DataFormatError, match=r"bomb\.png: 900,000,000 pixels, more than the limit"):
        load_dataset("imagefolder", data, image_size=8, val_fraction=0)
    code, err = cli(train_args(data, tmp_path / "runs"), capsys)
    refused(code, err, str(big), "900,000,000 pixels", f"{limit:,}", MAX_PIXELS_ENV)
    assert not (tmp_path / "runs" / "run").exists()
    # the store preparation (`fusionkd prepare`) decodes through the same check
    code, err = cli(["prepare", "--dataset", "imagefolder", f"data_dir={data}", "image_size=8",
                     f"store_dir={tmp_path / 'store'}"], capsys)
    refused(code, err, str(big), "900,000,000 pixels")


def test_the_pixel_limit_is_one_limit_and_can_be_raised(tmp_path, monkeypatch):
    """Pillow only warns between its limit and twice it; here everything above the limit is refused, nothing
    below it is, and ``FUSIONKD_MAX_IMAGE_PIXELS`` moves the limit, also past Pillow's own error (2x)."""
    from PIL import Image as PILImage

    for side in (10, 12, 15):
        Image.new("L", (side, side), 7).save(tmp_path / f"{side}.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "100")
    assert decode_image(tmp_path / "10.png", 4).shape == (4, 4, 3)  # exactly at the limit: read
    for side in (12, 15):  # 144: where Pillow would only warn; 225: where Pillow itself errors
        with pytest.raises(DataFormatError, match=rf"{side}\.png: .*more than the limit of 100 pixels"):
            decode_image(tmp_path / f"{side}.png", 4)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 50)  # a program lowered Pillow's limit...
    monkeypatch.setenv(MAX_PIXELS_ENV, "1_000")  # ...the variable still decides, above Pillow's 2x too
    assert decode_image(tmp_path / "15.png", 4).shape == (4, 4, 3)
    assert PILImage.MAX_IMAGE_PIXELS == 50  # Pillow's setting is left as it was
    monkeypatch.delenv(MAX_PIXELS_ENV)
    with pytest.raises(DataFormatError, match=r"more than the limit of 50 pixels"):  # unset: Pillow's limit
        decode_image(tmp_path / "10.png", 4)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match=f"{MAX_PIXELS_ENV}='lots': expected a positive whole number"):
        decode_image(tmp_path / "10.png", 4)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[int, Path]:
    """best.pt of a one-epoch synthetic run per channel count (1: grey, 3: RGB: two image readers)."""
    out = tmp_path_factory.mktemp("ckpt")
    found = {}
    for chans in (1, 3):
        r = fusionkd.train(method="baseline", model="resnet20", dataset="synthetic", image_size=8, epochs=1,
                           batch_size=16, threads=1, progress="none", out_dir=str(out), name=f"c{chans}",
                           dataset_options={"num_classes": 2, "in_chans": chans, "train_size": 32, "test_size": 8})
        found[chans] = r.run_dir / "best.pt"
    return found


@pytest.mark.parametrize("chans", [1, 3])
def test_predict_refuses_a_bomb_and_a_pipe(tmp_path, capsys, checkpoints, chans):
    big = bomb(tmp_path / "bomb.png")
    code, err = cli(["predict", str(checkpoints[chans]), str(big)], capsys)
    refused(code, err, str(big), "900,000,000 pixels", MAX_PIXELS_ENV)
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    code, err = cli_in_child(["predict", str(checkpoints[chans]), str(pipe)], timeout=60)
    refused(code, err, str(pipe), "named pipe (FIFO)")


# ------------------------------------------------------------------------------ 2. self-referencing link
def test_a_symlink_to_itself_is_refused(tmp_path, capsys):
    data = tree(tmp_path / "imgs")
    loop = data / "train" / "a" / "self.png"
    os.symlink("self.png", loop)
    code, err = cli(train_args(data, tmp_path / "runs"), capsys)
    refused(code, err, str(loop), "symbolic link that loops")
    assert not (tmp_path / "runs" / "run").exists()
    loop.unlink()
    dangling = data / "test" / "b" / "gone.png"
    os.symlink(tmp_path / "nowhere.png", dangling)
    code, err = cli(train_args(data, tmp_path / "runs"), capsys)
    refused(code, err, str(dangling), "which does not exist")
    assert not (tmp_path / "runs" / "run").exists()
    dangling.unlink()
    os.symlink(data / "train" / "a" / "train_a_0.png", dangling)  # a link to a real image is read
    assert len(load_dataset("imagefolder", data, image_size=8, val_fraction=0).test) == 5


# ------------------------------------------------------------------------------------- 3. named pipes
def test_a_named_pipe_in_an_image_folder_is_refused_without_blocking(tmp_path):
    data = tree(tmp_path / "imgs")
    pipe = data / "train" / "b" / "pipe.png"
    os.mkfifo(pipe)
    code, err = cli_in_child(train_args(data, tmp_path / "runs"), timeout=60)
    refused(code, err, str(pipe), "named pipe (FIFO), not a regular file", "only regular image files")
    assert not (tmp_path / "runs" / "run").exists()
    # `fusionkd prepare` (the store) lists the files through the same check
    code, err = cli_in_child(["prepare", "--dataset", "imagefolder", f"data_dir={data}", "image_size=8",
                              f"store_dir={tmp_path / 'store'}"], timeout=60)
    refused(code, err, str(pipe), "named pipe")
    # and a pipe handed straight to the decoder (as if swapped in after the listing) is refused, not waited on
    message = forked(lambda: _refusal(lambda: decode_image(pipe, 8)), timeout=30)
    assert str(pipe) in message and "named pipe" in message


def _refusal(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except DataFormatError as e:
        return str(e)
    return "not refused"


def test_the_official_layouts_refuse_pipes_and_loops(tmp_path):
    from official_trees import wnid, write_imagenet, write_tinyimagenet

    root = write_tinyimagenet(tmp_path / "tiny", classes=2, train_per_class=2, val_per_class=1)
    pipe = root / "train" / wnid(1) / "images" / "pipe.JPEG"
    os.mkfifo(pipe)
    message = forked(lambda: _refusal(lambda: load_dataset("tinyimagenet", tmp_path / "tiny",
                                                           storage="memory")), timeout=60)
    assert str(pipe) in message and "named pipe" in message
    pipe.unlink()
    listed = root / "val" / "images" / "val_0.JPEG"  # named by val_annotations.txt
    listed.unlink()
    os.mkfifo(listed)
    message = forked(lambda: _refusal(lambda: prepare_dataset("tinyimagenet", tmp_path / "tiny",
                                                              store_dir=str(tmp_path / "st"))), timeout=60)
    assert str(listed) in message and "named pipe" in message
    net = write_imagenet(tmp_path / "inet", classes=2, train_per_class=2, val_per_class=1)
    loop = next((net / "train").iterdir()) / "loop.JPEG"
    os.symlink(loop.name, loop)
    with pytest.raises(DataFormatError, match=rf"{loop}: a symbolic link that loops"):
        load_dataset("imagenet", net, storage="memory", crop="pad")


# ------------------------------------------------------------------------------------- 4. store manifest
@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("store")
    tree(tmp / "imgs")
    return prepare_dataset("imagefolder", tmp / "imgs", image_size=8, store_dir=str(tmp / "store")).root


def _edit(m: dict, store: Path, case: str) -> str:
    """Damage the manifest ``m`` of the store copy ``store`` as ``case`` says; returns what the refusal names."""
    outside = store.parent / "outside.u8"
    if case == "classes-not-a-list":
        m["classes"] = 2
        return "'classes' must be a list"
    if case == "one-class":
        m["classes"] = ["a"]
        return "a classifier needs at least two"
    if case == "mean-nan":
        m["mean"][1] = math.nan
        return "'mean' must be 3 finite numbers"
    if case == "std-inf":
        m["std"][0] = math.inf
        return "'std' must be 3 finite numbers"
    if case == "resolution-string":
        m["resolution"] = "8"
        return "'resolution' must be an int"
    if case == "not-an-object":
        m.clear()
        return "not the manifest object"
    if case == "absolute-shard":
        m["shards"]["train"][0]["file"] = str(store / "train-00000.u8")
        return "not a file name inside the store folder"
    if case == "dotdot-shard":
        shutil.copy(store / "train-00000.u8", outside)
        m["shards"]["train"][0]["file"] = "../outside.u8"
        return "not a file name inside the store folder"
    if case == "symlink-escaping":
        shutil.move(store / "train-00000.u8", outside)
        os.symlink(outside, store / "train-00000.u8")
        return f"symbolic link to {outside}, outside the store folder"
    if case == "fifo-shard":  # a shard is never opened before it is checked (a pipe would block its reader)
        (store / "train-00000.u8").unlink()
        os.mkfifo(store / "train-00000.u8")
        return "a named pipe (FIFO), not a regular file"
    if case == "labels-split-missing":
        del m["labels"]["test"]
        return "'labels' must be an object with one entry per split"
    if case == "shard-count":
        m["shards"]["train"][0]["count"] = True
        return "shard 0 of split 'train' must be"
    raise AssertionError(case)


MANIFEST_CASES = ["classes-not-a-list", "one-class", "mean-nan", "std-inf", "resolution-string", "not-an-object",
                  "absolute-shard", "dotdot-shard", "symlink-escaping", "fifo-shard", "labels-split-missing",
                  "shard-count"]


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_a_damaged_store_manifest_is_refused(tmp_path, capsys, store_dir, case):
    store = tmp_path / "store"
    shutil.copytree(store_dir, store)
    man = store / "manifest.json"
    m = json.loads(man.read_text())
    said = _edit(m, store, case)
    man.write_text(json.dumps([] if case == "not-an-object" else m))  # NaN / Infinity: as Python's json writes
    where = str(store / "train-00000.u8") if case in ("symlink-escaping", "fifo-shard") else str(man)
    with pytest.raises(StoreError) as e:
        Store(store)
    assert where in str(e.value) and said in str(e.value), str(e.value)
    code, err = cli(["train", *TINY, "dataset=store", f"data_dir={store}", f"out_dir={tmp_path / 'runs'}",
                     "name=run"], capsys)
    refused(code, err, where, said)
    assert not (tmp_path / "runs" / "run").exists()


def test_the_untouched_store_still_trains(tmp_path, store_dir):
    r = fusionkd.train(method="baseline", model="resnet20", dataset="store", data_dir=str(store_dir), epochs=1,
                       batch_size=4, threads=1, progress="none", val_fraction=0, out_dir=str(tmp_path), name="ok")
    assert r.summary["finished"] is True and all(math.isfinite(x) for x in Store(store_dir).mean)


# ------------------------------------------------------------------------------ 5. unreadable folders
@pytest.mark.parametrize("where", ["train/b", "test/a", "train"])
def test_an_unreadable_folder_is_refused_by_name(shared_tmp, tmp_path, capsys, where):
    """chmod 000 for real; as root (which reads it anyway) the command runs as ``nobody`` in a child."""
    # warm-up: a refusal on the same path in this process imports what it needs (``nobody`` cannot read this
    # interpreter's standard library under /root, so the child can use only modules already imported)
    refused(*cli(train_args(tree(tmp_path / "one", classes=("x",)), tmp_path / "runs"), capsys), "at least two")
    data = tree(shared_tmp / "imgs")
    out = shared_tmp / "runs"
    out.mkdir()
    out.chmod(0o777)
    for p in data.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    locked = data / where
    locked.chmod(0)
    user = NOBODY if os.geteuid() == 0 else None

    def probe() -> list:
        """Inside the child: who it is and whether the folder really cannot be listed."""
        try:
            os.listdir(locked)
            blocked = False
        except PermissionError:
            blocked = True
        return [os.geteuid(), blocked]

    uid, blocked = forked(probe, user=user, timeout=30)
    assert uid != 0 and blocked, "the child could still read the folder: the test would prove nothing"
    code, err = cli_in_child(train_args(data, out), user=user, timeout=120)
    refused(code, err, f"{locked}: cannot list the folder (permission denied")
    assert "Errno" not in err, err
    assert not (out / "run").exists() and stat.S_IMODE(locked.stat().st_mode) == 0


# ---------------------------------------------------------------------------------------- 6. one class
def test_a_one_class_folder_is_refused(tmp_path, capsys):
    data = tree(tmp_path / "imgs", classes=("only",))
    code, err = cli(train_args(data, tmp_path / "runs"), capsys)
    refused(code, err, str(data / "train"), "'only'", "at least two classes")
    assert not (tmp_path / "runs" / "run").exists()


def test_open_image_leaves_nothing_open_and_reads_normal_images(tmp_path):
    p = tmp_path / "ok.png"
    Image.fromarray(np.full((5, 7, 3), 9, np.uint8)).save(p)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with open_image(p) as im:
            assert im.size == (7, 5)
    assert len(os.listdir("/proc/self/fd")) == before
