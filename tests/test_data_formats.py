"""File formats: IDX, CIFAR pickles (safely), archives; Fashion-MNIST and CIFAR loaders on files written here
in the official formats."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from fusionkd.data import DataFormatError, DatasetNotFoundError, DownloadError, load_dataset, read_idx, safe_pickle_load
from fusionkd.data import datasets as ds
from fusionkd.data import download as dl

# ------------------------------------------------------------------------------------ writers


def write_idx(path: Path, arr: np.ndarray, *, gz: bool = True) -> Path:
    """The IDX format: 0x00 0x00 <type> <ndim>, big-endian uint32 dims, big-endian data."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
             np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}
    header = bytes([0, 0, codes[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    if gz:
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def write_fashion_mnist(folder: Path, n_train: int = 30, n_test: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": (np.arange(n_train) % 10).astype(np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": (np.arange(n_test) % 10).astype(np.uint8),
    }
    write_idx(folder / "train-images-idx3-ubyte.gz", arrays["train_x"])
    write_idx(folder / "train-labels-idx1-ubyte.gz", arrays["train_y"])
    write_idx(folder / "t10k-images-idx3-ubyte.gz", arrays["test_x"])
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", arrays["test_y"])
    return arrays


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root: Path, per_batch: int = 10, protocol: int = 2) -> dict[str, np.ndarray]:
    """cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} as the official pickles."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    xs, ys = [], []
    for i in range(1, 7):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        name = f"data_batch_{i}" if i < 6 else "test_batch"
        batch = {b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        xs.append(data)
        ys.append(labels)
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return {"train_x": np.concatenate(xs[:5]), "train_y": np.concatenate(ys[:5]), "test_x": xs[5],
            "test_y": np.asarray(ys[5])}


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100) -> dict[str, np.ndarray]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [i % 100 for i in range(n)]
        batch = {b"filenames": [b"x.png"] * n, b"batch_label": split.encode(), b"fine_labels": fine,
                 b"coarse_labels": [f // 5 for f in fine], b"data": data}
        (folder / split).write_bytes(pickle.dumps(batch, protocol=2))
        out[f"{split}_x"], out[f"{split}_y"] = data, np.asarray(fine)
    meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return out


@pytest.fixture(autouse=True)
def isolated_data_root(tmp_path, monkeypatch):
    """Never look at ./data or a developer's $FUSIONKD_DATA, nor at the system Fashion-MNIST."""
    monkeypatch.setenv("FUSIONKD_DATA", str(tmp_path / "fusionkd-data"))
    monkeypatch.setattr(ds.fashion_mnist, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-dir")


# ------------------------------------------------------------------------------------------ IDX


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, dtype, gz):
    arr = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4) if dtype != np.uint8 else \
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    got = read_idx(write_idx(tmp_path / "a.idx", arr, gz=gz))
    assert got.shape == arr.shape and got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, arr)


def test_read_idx_rejects_bad_files(tmp_path):
    good = write_idx(tmp_path / "good.gz", np.zeros((5, 4, 4), np.uint8), gz=False).read_bytes()
    cases = {
        "truncated.idx": (good[:-3], "truncated"),
        "trailing.idx": (good + b"x", "trailing"),
        "magic.idx": (b"\x01\x02" + good[2:], "not an IDX file"),
        "code.idx": (good[:2] + b"\x42" + good[3:], "unknown IDX type code 0x42"),
        "header.idx": (good[:6], "truncated IDX header"),
        "badgz.gz": (gzip.compress(good)[:-10], "corrupt or truncated"),
    }
    for name, (content, match) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataFormatError, match=match) as e:
            read_idx(path)
        assert str(path) in str(e.value)


def test_fashion_mnist_from_data_dir(tmp_path):
    arrays = write_fashion_mnist(tmp_path / "fm")
    splits = load_dataset("fashion-mnist", tmp_path / "fm", val_fraction=0)
    assert splits.train.images.shape == (30, 1, 28, 28) and splits.test.images.shape == (20, 1, 28, 28)
    np.testing.assert_array_equal(splits.train.images[:, 0].numpy(), arrays["train_x"])
    np.testing.assert_array_equal(splits.test.labels.numpy(), arrays["test_y"])
    assert splits.val is None and splits.info.classes[0] == "T-shirt/top" and splits.info.mean == (0.2860,)
    # data_dir may also be the parent of a fashion-mnist/ folder, and $FUSIONKD_DATA/fashion-mnist works too
    write_fashion_mnist(tmp_path / "parent" / "fashion-mnist", n_train=35)
    assert len(load_dataset("fashion-mnist", tmp_path / "parent", val_fraction=0).train) == 35
    write_fashion_mnist(Path(os.environ["FUSIONKD_DATA"]) / "fashion-mnist", n_train=40)
    assert len(load_dataset("fashion-mnist", val_fraction=0).train) == 40


def test_fashion_mnist_count_mismatch_and_truncation(tmp_path):
    write_fashion_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(29, np.uint8))
    with pytest.raises(DataFormatError, match="30 images but .* 29 labels"):
        load_dataset("fashion-mnist", tmp_path)
    write_fashion_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
    with pytest.raises(DataFormatError, match="t10k-images-idx3-ubyte.gz: IDX payload truncated"):
        load_dataset("fashion-mnist", tmp_path)


def test_fashion_mnist_missing_lists_places_and_fix(tmp_path):
    (tmp_path / "partial").mkdir()
    write_idx(tmp_path / "partial" / "train-images-idx3-ubyte.gz", np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("fashion-mnist", tmp_path / "partial")
    msg = str(e.value)
    # a data_dir the user gave is the only place searched: never replaced by another copy
    assert str(tmp_path / "partial") in msg and os.environ["FUSIONKD_DATA"] not in msg
    assert "no-system-dir" not in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "lacks" in msg and "t10k-labels-idx1-ubyte.gz" in msg
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("fashion-mnist")  # without data_dir: FUSIONKD_DATA and the system folder
    assert os.environ["FUSIONKD_DATA"] in str(e.value) and "no-system-dir" in str(e.value)


# ------------------------------------------------------------------------------------ pickles


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_malicious_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    for i, payload in enumerate([
        {b"data": Evil(marker)},
        [Evil(marker)],
        pickle.loads(pickle.dumps({b"x": 1})) | {b"y": Evil(marker)},
    ]):
        path = tmp_path / f"evil{i}"
        path.write_bytes(pickle.dumps(payload, protocol=2))
        with pytest.raises(DataFormatError, match="refusing to load global posix.makedirs|refusing to load global os"):
            safe_pickle_load(path)
    assert not marker.exists()
    # builtins are no safer: eval/exec/getattr are refused too
    evil = b"cbuiltins\neval\n(S'1+1'\ntR."
    (tmp_path / "eval").write_bytes(evil)
    with pytest.raises(DataFormatError, match="builtins.eval"):
        safe_pickle_load(tmp_path / "eval")


def test_safe_pickle_loads_numpy_and_containers(tmp_path):
    obj = {b"a": np.arange(6, dtype=np.uint8).reshape(2, 3), "b": [1, 2.5, "x", b"y", (3, None)],
           b"c": np.float64(2.0), b"d": np.zeros(3, dtype=np.int64)}
    for protocol in (2, 4, 5):
        path = tmp_path / f"ok{protocol}"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        got = safe_pickle_load(path)
        np.testing.assert_array_equal(got[b"a"], obj[b"a"])
        assert got["b"] == obj["b"] and float(got[b"c"]) == 2.0
    (tmp_path / "trunc").write_bytes(pickle.dumps(obj, protocol=2)[:40])
    with pytest.raises(DataFormatError, match="trunc"):
        safe_pickle_load(tmp_path / "trunc")


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar10_loader(tmp_path, protocol):
    arrays = write_cifar10(tmp_path, protocol=protocol)
    splits = load_dataset("cifar10", tmp_path, val_fraction=0)
    assert splits.train.images.shape == (50, 3, 32, 32) and splits.test.images.shape == (10, 3, 32, 32)
    # row layout: 1024 red, 1024 green, 1024 blue values, each row-major 32x32
    np.testing.assert_array_equal(splits.train.images[7, 1].numpy(), arrays["train_x"][7, 1024:2048].reshape(32, 32))
    np.testing.assert_array_equal(splits.train.labels.numpy(), arrays["train_y"])
    np.testing.assert_array_equal(splits.test.labels.numpy(), arrays["test_y"])
    assert splits.info.classes == CIFAR10_NAMES and splits.info.in_chans == 3 and splits.info.image_size == 32
    assert splits.info.mean == (0.4914, 0.4822, 0.4465)
    # the batches folder itself is accepted as data_dir
    assert len(load_dataset("cifar10", tmp_path / "cifar-10-batches-py", val_fraction=0).train) == 50


def test_cifar100_loader(tmp_path):
    arrays = write_cifar100(tmp_path / "cifar100")
    splits = load_dataset("cifar100", tmp_path, val_fraction=0.5)  # finds <data_dir>/cifar100/cifar-100-python
    assert splits.info.classes == [f"fine{i}" for i in range(100)] and len(splits.test) == 100
    assert len(splits.train) == 100 and len(splits.val) == 100
    np.testing.assert_array_equal(splits.test.labels.numpy(), arrays["test_y"])
    assert splits.train.class_counts(100).tolist() == [1] * 100


def test_cifar_rejects_malicious_batch(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(marker)}, protocol=2))
    with pytest.raises(DataFormatError, match="data_batch_3: unsafe or invalid pickle"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_cifar_bad_batch_shape(tmp_path):
    write_cifar10(tmp_path)
    bad = {b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataFormatError, match=r"test_batch: 'data' must be uint8 of shape \(N, 3072\)"):
        load_dataset("cifar10", tmp_path)


def test_cifar_missing_says_where_to_put_files(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("cifar10", tmp_path / "nowhere")
    msg = str(e.value)
    assert "cifar-10-python.tar.gz" in msg and str(tmp_path / "nowhere") in msg and "download=True" in msg


# ---------------------------------------------------------------------------- download, extract


def test_download_fails_fast_offline(tmp_path, monkeypatch):
    calls = []

    def offline(url, timeout):
        calls.append((url, timeout))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    def no_waiting(seconds):
        raise AssertionError(f"the download waited {seconds} s (a retry back-off?) instead of failing at once")

    monkeypatch.setattr(dl, "open_url", offline)
    monkeypatch.setattr(time, "sleep", no_waiting)
    with pytest.raises(DownloadError) as e:
        load_dataset("cifar10", tmp_path / "c10", download=True)
    # fast means: one attempt, with the short connection timeout, and no sleeping or retrying after it
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", dl.TIMEOUT_S)]
    assert dl.TIMEOUT_S <= 10
    msg = str(e.value)
    assert "no internet" in msg and "cifar-10-python.tar.gz" in msg and "extract" in msg
    assert str(tmp_path / "c10") in msg
    assert not list((tmp_path / "c10").glob("*.part*"))  # no partial file left behind


def make_archive(src_root: Path, members: list[str], dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        for m in members:
            tar.add(src_root / m, arcname=m)
    return dest


def test_download_verifies_and_extracts(tmp_path, monkeypatch):
    write_cifar10(tmp_path / "src")
    archive = make_archive(tmp_path / "src", ["cifar-10-batches-py"], tmp_path / "c.tar.gz")
    blob = archive.read_bytes()
    spec = dataclasses.replace(ds.CIFAR_SPECS["cifar10"], md5=hashlib.md5(blob).hexdigest())
    monkeypatch.setitem(ds.CIFAR_SPECS, "cifar10", spec)
    monkeypatch.setattr(dl, "open_url", lambda url, timeout: io.BytesIO(blob))
    splits = load_dataset("cifar10", tmp_path / "dest", download=True, val_fraction=0)
    assert len(splits.train) == 50 and (tmp_path / "dest" / "cifar-10-python.tar.gz").is_file()
    assert (tmp_path / "dest" / "cifar-10-batches-py" / "test_batch").is_file()
    # a checksum mismatch is refused and leaves nothing behind
    monkeypatch.setitem(ds.CIFAR_SPECS, "cifar10", dataclasses.replace(spec, md5="0" * 32))
    with pytest.raises(DownloadError, match="does not match the official"):
        load_dataset("cifar10", tmp_path / "dest2", download=True)
    assert not (tmp_path / "dest2" / "cifar-10-python.tar.gz").exists()


def test_archive_left_in_place_is_extracted_without_network(tmp_path, monkeypatch):
    write_cifar10(tmp_path / "src")
    (tmp_path / "dest").mkdir()
    archive = make_archive(tmp_path / "src", ["cifar-10-batches-py"], tmp_path / "dest" / "cifar-10-python.tar.gz")
    spec = dataclasses.replace(ds.CIFAR_SPECS["cifar10"], md5=dl.md5sum(archive))
    monkeypatch.setitem(ds.CIFAR_SPECS, "cifar10", spec)
    monkeypatch.setattr(dl, "open_url", lambda url, timeout: pytest.fail("must not touch the network"))
    assert len(load_dataset("cifar10", tmp_path / "dest", val_fraction=0).test) == 10


@pytest.mark.parametrize("evil", ["../escape.txt", "/abs.txt", "a/../../escape.txt", "link"])
def test_safe_extract_refuses_path_traversal_and_links(tmp_path, evil):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        if evil == "link":
            info = tarfile.TarInfo("link")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        else:
            info = tarfile.TarInfo(evil)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(DownloadError, match="refusing member"):
        dl.safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists() and not list((tmp_path / "out").iterdir())
