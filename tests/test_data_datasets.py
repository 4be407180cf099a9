"""Datasets: registry, splits and subsets, image folders (CINIC-10, imagefolder) with their cache, digits,
synthetic, DatasetInfo, and the real Fashion-MNIST when installed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fusionkd.data import DATASETS, DataFormatError, DatasetInfo, DatasetNotFoundError, list_datasets, load_dataset
from fusionkd.data import datasets as ds
from fusionkd.data.splits import allocate, stratified_split, stratified_subset
from fusionkd.registry import UnknownNameError

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONKD_DATA", str(tmp_path / "fusionkd-data"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the ~/.cache fallback stays inside the test


# ------------------------------------------------------------------------------------ registry


def test_registry_lists_every_dataset_with_a_description():
    names = list_datasets()
    assert names == ["fashion-mnist", "cifar10", "cifar100", "cinic10", "imagefolder", "digits", "synthetic",
                     "tinyimagenet", "cub200", "imagenet", "store"]
    for entry in DATASETS.entries():
        assert entry.description and "\n" not in entry.description
        assert {"in_chans", "image_size", "num_classes"} <= set(entry.extras)


def test_unknown_dataset_lists_accepted_names():
    with pytest.raises(UnknownNameError) as e:
        load_dataset("cifar-10")
    msg = str(e.value)
    assert "unknown dataset 'cifar-10'" in msg and "Did you mean 'cifar10'" in msg
    for name in list_datasets():
        assert name in msg


def test_unknown_option_and_bad_arguments():
    with pytest.raises(ValueError, match="accepted options: num_classes, in_chans, train_size, test_size"):
        load_dataset("synthetic", colour=True)
    with pytest.raises(ValueError, match="accepted options: none"):
        load_dataset("cifar10", num_classes=3)
    for bad in (1.0, -0.1, 1.5, "0.1"):
        with pytest.raises(ValueError, match=r"val_fraction must be a number in \[0, 1\)"):
            load_dataset("synthetic", val_fraction=bad)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="subset must be a positive int"):
            load_dataset("synthetic", subset=bad)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("synthetic", image_size=2)


# ---------------------------------------------------------------------------------- splits, subset


def test_allocate_is_proportional_and_exact():
    assert allocate(np.array([50, 30, 20]), 10).tolist() == [5, 3, 2]
    assert allocate(np.array([1, 1, 1]), 2).sum() == 2
    take = allocate(np.array([97, 2, 1]), 10, minimum=1)
    assert take.sum() == 10 and take.min() >= 1


def test_val_split_stratified_deterministic_disjoint():
    splits = load_dataset("synthetic", val_fraction=0.2)  # 500 train images, 50 per class
    assert len(splits.train) == 400 and len(splits.val) == 100
    assert splits.val.class_counts(10).tolist() == [10] * 10
    assert splits.train.class_counts(10).tolist() == [40] * 10
    again = load_dataset("synthetic", val_fraction=0.2)
    assert torch.equal(splits.val.images, again.val.images)  # seed 0 -> the same split every time
    other = load_dataset("synthetic", val_fraction=0.2, seed=1)
    assert not torch.equal(splits.val.images, other.val.images)
    assert torch.equal(splits.test.images, other.test.images)  # the test split never depends on the seed
    # disjoint and covering, checked on indices
    labels = load_dataset("synthetic", val_fraction=0).train.labels.numpy()
    tr, va = stratified_split(labels, 0.2, 0, 10)
    assert not set(tr) & set(va) and sorted([*tr, *va]) == list(range(500))


def test_val_split_on_imbalanced_labels_keeps_every_class_in_train():
    labels = np.array([0] * 90 + [1] * 8 + [2] * 2)
    tr, va = stratified_split(labels, 0.5, 0, 3)
    assert len(va) == 50
    assert np.bincount(labels[tr], minlength=3).min() >= 1
    with pytest.raises(ValueError, match="without a training image"):
        stratified_split(np.array([0, 1, 2]), 0.9, 0, 3)


def test_subset_stratified_seeded_after_val():
    splits = load_dataset("synthetic", val_fraction=0.1, subset=100)
    assert len(splits.train) == 100 and len(splits.val) == 50
    assert splits.train.class_counts(10).tolist() == [10] * 10
    full = load_dataset("synthetic", val_fraction=0.1)
    # the subset is drawn from what the validation split left
    train_rows = {bytes(x.numpy().tobytes()) for x in full.train.images}
    assert all(bytes(x.numpy().tobytes()) in train_rows for x in splits.train.images)
    again = load_dataset("synthetic", val_fraction=0.1, subset=100)
    assert torch.equal(splits.train.images, again.train.images)
    assert not torch.equal(splits.train.images, load_dataset("synthetic", val_fraction=0.1, subset=100,
                                                             seed=2).train.images)
    skewed = np.array([0] * 80 + [1] * 15 + [2] * 5)
    picked = stratified_subset(skewed, 10, 0, 3)  # proportional [8, 1.5, 0.5], every class at least once
    assert np.bincount(skewed[picked], minlength=3).tolist() == [8, 1, 1]


def test_subset_errors_are_clear():
    with pytest.raises(ValueError, match="subset=451 is larger than the 450 training images"):
        load_dataset("synthetic", subset=451)
    with pytest.raises(ValueError, match="subset=9 is smaller than the number of classes \\(10\\)"):
        load_dataset("synthetic", subset=9)


# -------------------------------------------------------------------------- DatasetInfo, synthetic


def test_dataset_info_roundtrip_json_yaml():
    info = load_dataset("synthetic", val_fraction=0).info
    d = info.to_dict()
    assert DatasetInfo.from_dict(json.loads(json.dumps(d))) == info
    assert DatasetInfo.from_dict(yaml.safe_load(yaml.safe_dump(d))) == info
    assert DatasetInfo.from_dict({**d, "future_key": 1}) == info
    with pytest.raises(ValueError, match="missing \\['std'\\]"):
        DatasetInfo.from_dict({k: v for k, v in d.items() if k != "std"})
    assert info.num_classes == 10 and info.in_chans == 3 and info.image_size == 32


def test_synthetic_options_deterministic_and_learnable():
    s = load_dataset("synthetic", image_size=12, val_fraction=0, num_classes=4, in_chans=1, train_size=80,
                     test_size=40)
    assert s.train.images.shape == (80, 1, 12, 12) and s.test.images.shape == (40, 1, 12, 12)
    assert s.info.classes == ["class_0", "class_1", "class_2", "class_3"]
    assert s.train.class_counts(4).tolist() == [20] * 4
    again = load_dataset("synthetic", image_size=12, val_fraction=0, num_classes=4, in_chans=1, train_size=80,
                         test_size=40)
    assert torch.equal(s.train.images, again.train.images)
    # learnable: a nearest-class-mean classifier is far above chance
    big = load_dataset("synthetic", val_fraction=0)
    x = big.train.images.float().flatten(1)
    centroids = torch.stack([x[big.train.labels == k].mean(0) for k in range(10)])
    pred = torch.cdist(big.test.images.float().flatten(1), centroids).argmin(1)
    assert (pred == big.test.labels).float().mean() > 0.8
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        load_dataset("synthetic", num_classes=1)


def write_tiny_fashion_mnist(folder: Path, n: int = 30) -> None:
    """The four IDX files (gzip; header 0x00 0x00 0x08 ndim, big-endian dims) with random content."""
    import gzip
    import struct

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            header = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
            (folder / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + arr.tobytes()))


def test_image_size_resizes_fixed_size_datasets_and_recomputes_stats(tmp_path):
    write_tiny_fashion_mnist(tmp_path / "fm")
    s = load_dataset("fashion-mnist", tmp_path / "fm", image_size=32, val_fraction=0)
    assert s.train.images.shape == (30, 1, 32, 32) and s.info.image_size == 32
    assert s.info.mean != (0.2860,)  # recomputed from the resized random images
    assert abs(s.info.mean[0] - ds.channel_stats(s.train.images)[0][0]) < 1e-12


def test_channel_stats_exact():
    x = torch.randint(0, 256, (7, 2, 5, 5), dtype=torch.uint8)
    mean, std = ds.channel_stats(x)
    f = x.double() / 255
    assert np.allclose(mean, f.mean(dim=(0, 2, 3)).numpy()) and np.allclose(std, f.std(dim=(0, 2, 3),
                                                                                   unbiased=False).numpy())


# ------------------------------------------------------------------------------ image folders


def write_png_tree(root: Path, splits: dict[str, int], classes: list[str], size=(32, 32), mode="RGB",
                   ext=".png", seed: int = 0, prefix: str = "") -> None:
    rng = np.random.default_rng(seed)
    for split, n in splits.items():
        for ci, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for j in range(n):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                arr = rng.integers(0, 256, shape, dtype=np.uint8)
                arr[..., :] = (arr // 4 + ci * 20).astype(np.uint8) if mode == "RGB" else arr // 4 + ci * 20
                Image.fromarray(arr, mode=mode).save(d / f"{prefix}{split}_{cls}_{j}{ext}")


def test_cinic10_layout_cache_reuse_and_invalidation(tmp_path, monkeypatch):
    root = tmp_path / "cinic"
    write_png_tree(root, {"train": 3, "valid": 2, "test": 1}, ds.CINIC10_CLASSES)
    (root / "train" / "cat" / "README.txt").write_text("not an image")  # ignored
    cache = tmp_path / "cache"
    s = load_dataset("cinic10", root, cache_dir=cache)
    assert s.train.images.shape == (30, 3, 32, 32) and len(s.val) == 20 and len(s.test) == 10
    assert s.info.classes == ds.CINIC10_CLASSES and s.info.mean == ds.CINIC10_MEAN
    assert s.train.class_counts(10).tolist() == [3] * 10
    # pixels are the PNG's pixels, in sorted file order per class
    first = np.asarray(Image.open(root / "train" / "airplane" / "train_airplane_0.png")).transpose(2, 0, 1)
    np.testing.assert_array_equal(s.train.images[0].numpy(), first)
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / "train_images.npy").is_file()
    assert s.train.images.dtype == torch.uint8
    assert load_dataset("cinic10", root, val_fraction=0, cache_dir=cache).val is None

    def no_decoding(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(ds.storage, "decode_images", no_decoding)  # where the image folders use it
    again = load_dataset("cinic10", root, cache_dir=cache)
    assert torch.equal(again.train.images, s.train.images)
    monkeypatch.undo()
    monkeypatch.setenv("FUSIONKD_DATA", str(tmp_path / "fusionkd-data"))
    # adding a file changes the fingerprint: decoded again, the stale entry is replaced
    write_png_tree(root, {"train": 4}, ["dog"], seed=9)
    grown = load_dataset("cinic10", root, cache_dir=cache)
    assert len(grown.train) == 31
    entries2 = [p for p in cache.iterdir() if p.is_dir()]
    assert len(entries2) == 1 and entries2 != entries


def test_cinic10_default_cache_next_to_data_then_fallback(tmp_path, monkeypatch):
    root = tmp_path / "cinic"
    write_png_tree(root, {"train": 1, "valid": 1, "test": 1}, ds.CINIC10_CLASSES)
    load_dataset("cinic10", root)
    assert any((root / ".fusionkd_cache").iterdir())
    # the data folder is read-only: the cache goes to $FUSIONKD_DATA/.cache
    root2 = tmp_path / "cinic2"
    write_png_tree(root2, {"train": 1, "valid": 1, "test": 1}, ds.CINIC10_CLASSES)
    real_writable = ds.ArrayCache.save.__globals__["writable_dir"]
    monkeypatch.setitem(ds.ArrayCache.save.__globals__, "writable_dir",
                        lambda p: False if str(p).startswith(str(root2)) else real_writable(p))
    load_dataset("cinic10", root2)
    assert any((Path(os.environ["FUSIONKD_DATA"]) / ".cache").iterdir())


def test_cinic10_missing_and_bad_class(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="(?s)CINIC-10 not found.*datashare"):
        load_dataset("cinic10", tmp_path / "none")
    root = tmp_path / "cinic"
    write_png_tree(root, {"train": 1, "valid": 1, "test": 1}, ds.CINIC10_CLASSES + ["zebra"])
    with pytest.raises(DataFormatError, match="zebra"):
        load_dataset("cinic10", root)


def test_imagefolder_rgb_resize_and_stats(tmp_path):
    root = tmp_path / "imgs"
    write_png_tree(root, {"train": 4, "test": 2}, ["b_cls", "a_cls"], size=(20, 12))
    write_png_tree(root, {"train": 1}, ["a_cls"], size=(8, 8), ext=".JPG", seed=3, prefix="z_")  # sorts last
    s = load_dataset("imagefolder", root, image_size=16, val_fraction=0, cache_dir=tmp_path / "c")
    assert s.info.classes == ["a_cls", "b_cls"] and s.info.in_chans == 3 and s.info.image_size == 16
    assert s.train.images.shape == (9, 3, 16, 16) and s.train.class_counts(2).tolist() == [5, 4]
    mean, std = ds.channel_stats(s.train.images)
    assert s.info.mean == pytest.approx(mean) and s.info.std == pytest.approx(std)
    # centre-crop to a square, then resize: what Pillow gives for the same steps
    im = Image.open(root / "train" / "a_cls" / "train_a_cls_0.png").convert("RGB").crop((4, 0, 16, 12))
    want = np.asarray(im.resize((16, 16), Image.BILINEAR)).transpose(2, 0, 1)
    np.testing.assert_array_equal(s.train.images[0].numpy(), want)


def test_imagefolder_grayscale_auto_forced_and_val(tmp_path):
    root = tmp_path / "gray"
    write_png_tree(root, {"train": 3, "val": 2, "test": 1}, ["x", "y"], size=(10, 10), mode="L")
    s = load_dataset("imagefolder", root, image_size=10)
    assert s.info.in_chans == 1 and s.train.images.shape == (6, 1, 10, 10)
    assert len(s.val) == 4  # the shipped val/ split is used as the validation split
    raw = np.asarray(Image.open(root / "train" / "x" / "train_x_0.png"))
    np.testing.assert_array_equal(s.train.images[0, 0].numpy(), raw)
    rgb = load_dataset("imagefolder", root, image_size=10, channels="rgb")
    assert rgb.info.in_chans == 3 and torch.equal(rgb.train.images[:, 0], rgb.train.images[:, 2])
    colour = tmp_path / "colour"
    write_png_tree(colour, {"train": 2, "test": 1}, ["x", "y"], size=(6, 6))
    g = load_dataset("imagefolder", colour, image_size=6, channels="grayscale", val_fraction=0)
    pil = np.asarray(Image.open(colour / "train" / "x" / "train_x_0.png").convert("L"))
    np.testing.assert_array_equal(g.train.images[0, 0].numpy(), pil)
    with pytest.raises(ValueError, match="channels must be"):
        load_dataset("imagefolder", colour, channels="cmyk")


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="imagefolder needs data_dir"):
        load_dataset("imagefolder")
    root = tmp_path / "imgs"
    write_png_tree(root, {"train": 2}, ["a", "b"], size=(6, 6))
    with pytest.raises(DatasetNotFoundError, match=r"missing split folder\(s\) \['test'\]"):
        load_dataset("imagefolder", root)
    write_png_tree(root, {"test": 1}, ["a", "c"], size=(6, 6))
    with pytest.raises(DataFormatError, match=r"class folders \['c'\] are not among the classes"):
        load_dataset("imagefolder", root)
    (root / "test" / "c" / "test_c_0.png").unlink()
    (root / "test" / "c").rmdir()
    # an evaluation split may lack classes; a training class may not
    assert load_dataset("imagefolder", root, image_size=6, val_fraction=0).test.class_counts(2).tolist() == [1, 0]
    (root / "train" / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataFormatError, match="broken.png: cannot decode image"):
        load_dataset("imagefolder", root)
    for f in (root / "train" / "b").iterdir():
        f.unlink()
    with pytest.raises(DataFormatError, match="no images"):
        load_dataset("imagefolder", root)


# ------------------------------------------------------------------------------------ digits


def test_digits():
    pytest.importorskip("sklearn")
    s = load_dataset("digits", val_fraction=0)
    assert len(s.train) + len(s.test) == 1797 and len(s.test) == round(0.2 * 1797)
    assert s.train.images.shape[1:] == (1, 16, 16) and s.info.classes == [str(i) for i in range(10)]
    assert int(s.train.images.max()) == 255 and s.info.in_chans == 1
    counts = s.test.class_counts(10)
    assert counts.min() >= 34 and counts.max() <= 38  # stratified
    # nearest-neighbour upsampling of the 8x8 originals: 2x2 blocks
    img = s.train.images[0, 0]
    assert torch.equal(img, img[::2, ::2].repeat_interleave(2, 0).repeat_interleave(2, 1))
    other_seed = load_dataset("digits", val_fraction=0.1, seed=5)
    assert torch.equal(other_seed.test.images, s.test.images)  # the test split is fixed
    assert load_dataset("digits", image_size=24, val_fraction=0).train.images.shape[-1] == 24


def test_digits_without_sklearn(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    ds.digits_arrays.cache_clear()  # parsed once per process: forget an earlier load
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_dataset("digits")


# ------------------------------------------------------------------------------ real Fashion-MNIST


def test_real_fashion_mnist(monkeypatch):
    if not (FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST is not installed in {FMNIST} (apt-get install dataset-fashion-mnist)")
    calls = []
    real = ds.read_idx_pair

    def spy(images_path, labels_path):
        calls.append((Path(images_path).name, Path(labels_path).name))
        return real(images_path, labels_path)

    monkeypatch.setattr(ds.fashion_mnist, "read_idx_pair", spy)  # where Fashion-MNIST uses it
    s = load_dataset("fashion-mnist", val_fraction=0)
    # each of the four files parsed once, in one vectorised read per pair (~0.8 s on an idle 2-core machine)
    assert calls == [("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                     ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")]
    assert s.train.images.shape == (60000, 1, 28, 28) and s.test.images.shape == (10000, 1, 28, 28)
    assert s.train.images.dtype == torch.uint8 and s.train.labels.dtype == torch.int64
    assert s.train.class_counts(10).tolist() == [6000] * 10 and s.test.class_counts(10).tolist() == [1000] * 10
    mean, std = ds.channel_stats(s.train.images)
    assert s.info.mean == pytest.approx(mean, abs=5e-5) and s.info.std == pytest.approx(std, abs=5e-5)
    v = load_dataset("fashion-mnist")
    assert len(v.train) == 54000 and v.val.class_counts(10).tolist() == [600] * 10
