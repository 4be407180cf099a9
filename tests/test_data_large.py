"""The large-data path: official layouts (TinyImageNet, CUB-200-2011, ImageNet) on tiny trees of real JPEGs,
the prepared store (contents, refusals, kill -9 and resume), the store loader (same batches as the
in-memory loader, random-resized crop), and training through the CLI, compare and the API."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from official_trees import write_cub200, write_imagenet, write_tinyimagenet
from PIL import Image

import fusionkd
from fusionkd.cli import main
from fusionkd.data import (
    ArrayDataset,
    DataFormatError,
    DeviceLoader,
    Store,
    StoreError,
    StoreLoader,
    StoreMismatchError,
    load_dataset,
    prepare_dataset,
)
from fusionkd.data.formats import decode_image
from fusionkd.data.store_loader import draw_resized_crops, resized_crop
from fusionkd.engine.checkpoint import load_checkpoint

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("trees")
    write_tinyimagenet(d)
    write_cub200(d)
    for layout in ("sorted", "csv", "devkit"):
        (d / layout).mkdir()
        write_imagenet(d / layout, layout)
    return d


def _copy(trees: Path, name: str, tmp_path: Path) -> Path:
    shutil.copytree(trees / name, tmp_path / name)
    return tmp_path


# ---------------------------------------------------------------------------------- layouts


def test_tinyimagenet_layout_classes_labels_and_pixels(trees, tmp_path):
    s = load_dataset("tinyimagenet", trees, val_fraction=0, store_dir=str(tmp_path / "st"))
    assert s.info.classes == ["class 0, kind 0", "class 1, kind 1", "class 2, kind 2"]  # sorted wnids, words.txt
    assert (s.info.image_size, s.info.in_chans) == (64, 3)
    assert len(s.train) == 18 and len(s.test) == 6  # official val is the test split; test/ (unlabelled) ignored
    assert s.train.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    ann = (trees / "tiny-imagenet-200/val/val_annotations.txt").read_text().split("\n")
    want = {line.split("\t")[0]: line.split("\t")[1] for line in ann if line}
    wnids = sorted(set(want.values()))
    names = sorted(want)  # the test split is in file-name order
    assert s.test.labels.tolist() == [wnids.index(want[n]) for n in names]
    got = s.test.read(np.arange(len(s.test)))
    for i, n in enumerate(names):
        ref = decode_image(trees / "tiny-imagenet-200/val/images" / n, 64).transpose(2, 0, 1)
        assert np.array_equal(got[i], ref), n


def test_tinyimagenet_memory_storage_matches_the_store(trees, tmp_path):
    mem = load_dataset("tinyimagenet", trees, storage="memory", cache_dir=tmp_path / "c", val_fraction=0.2)
    st = load_dataset("tinyimagenet", trees, store_dir=str(tmp_path / "st"), val_fraction=0.2)
    assert isinstance(mem.train, ArrayDataset)
    assert torch.equal(mem.train.labels, st.train.labels) and torch.equal(mem.val.labels, st.val.labels)
    assert np.array_equal(mem.train.images.numpy(), st.train.read(np.arange(len(st.train))))
    assert mem.info.classes == st.info.classes


def test_cub200_layout(trees, tmp_path):
    s = load_dataset("cub200", trees, val_fraction=0, image_size=32, store_dir=str(tmp_path / "st"))
    assert s.info.classes == ["Bird kind 0", "Bird kind 1", "Bird kind 2"]
    assert (len(s.train), len(s.test)) == (12, 6)  # train_test_split.txt: every third image is a test image
    assert s.train.resolution == 37 and s.info.image_size == 32 and s.train.crop == "random-resized"
    lines = (trees / "CUB_200_2011/images.txt").read_text().split()
    rel = dict(zip(lines[0::2], lines[1::2]))
    ref = decode_image(trees / "CUB_200_2011/images" / rel["3"], 37).transpose(2, 0, 1)  # image 3: the first test one
    assert np.array_equal(s.test.read(np.array([0]))[0], ref)
    assert s.test.labels.tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("layout", ["sorted", "csv", "devkit"])
def test_imagenet_val_layouts(trees, tmp_path, layout):
    s = load_dataset("imagenet", trees / layout / "imagenet", val_fraction=0, image_size=16, store_size=16,
                     store_dir=str(tmp_path / "st"))
    assert len(s.train) == 18 and len(s.test) == 6
    # every validation image carries its true class (its pixels follow that class's pattern)
    truth = [i for _ in range(2) for i in range(3)]
    if layout == "sorted":
        assert s.test.labels.tolist() == sorted(truth)
    else:
        assert s.test.labels.tolist() == truth
    if layout == "csv":
        assert s.info.classes[0] == "thing 0, other name"  # from LOC_synset_mapping.txt
    assert s.info.mean == pytest.approx((0.485, 0.456, 0.406))


def test_imagefolder_store_storage_matches_memory(tmp_path):
    from official_trees import class_image

    root = tmp_path / "folder"
    for split, n in (("train", 4), ("test", 2)):
        for c in range(2):
            (root / split / f"k{c}").mkdir(parents=True)
            for k in range(n):
                class_image(c, k, (50 + 9 * k, 40)).save(root / split / f"k{c}" / f"{k}.jpg")
    mem = load_dataset("imagefolder", root, val_fraction=0, cache_dir=tmp_path / "c")
    st = load_dataset("imagefolder", root, val_fraction=0, storage="store", cache_dir=tmp_path / "c")
    assert isinstance(mem.train, ArrayDataset) and not isinstance(st.train, ArrayDataset)
    assert next((tmp_path / "c").glob("store-imagefolder-*/manifest.json"))  # found in the cache location
    for a, b in ((mem.train, st.train), (mem.test, st.test)):
        assert torch.equal(a.labels, b.labels)
        assert np.array_equal(a.images.numpy(), b.read(np.arange(len(b))))
    with pytest.raises(ValueError, match="crop='pad' trains on the stored images at their own size"):
        load_dataset("imagefolder", root, storage="store", store_size=40, cache_dir=tmp_path / "c")


def test_layout_errors_name_the_file(trees, tmp_path):
    root = _copy(trees, "CUB_200_2011", tmp_path)
    victim = sorted((root / "CUB_200_2011/images").rglob("*.jpg"))[0]
    victim.unlink()
    with pytest.raises(DataFormatError, match=f"{victim.name}.*missing"):
        load_dataset("cub200", root, store_dir=str(tmp_path / "st"))
    root2 = _copy(trees, "tiny-imagenet-200", tmp_path)
    ann = root2 / "tiny-imagenet-200/val/val_annotations.txt"
    ann.write_text(ann.read_text().replace("n01440764", "n12345678", 1))
    with pytest.raises(DataFormatError, match=r"val_annotations.txt:\d+: wnid 'n12345678' is not in wnids.txt"):
        load_dataset("tinyimagenet", root2, store_dir=str(tmp_path / "st2"))
    flat = tmp_path / "flat"
    shutil.copytree(trees / "csv/imagenet/ILSVRC/Data/CLS-LOC", flat)
    with pytest.raises(DataFormatError, match="flat validation images but no labels"):
        load_dataset("imagenet", flat, store_dir=str(tmp_path / "st3"))


def test_corrupt_image_names_the_file(trees, tmp_path):
    root = _copy(trees, "tiny-imagenet-200", tmp_path)
    bad = root / "tiny-imagenet-200/train" / sorted(os.listdir(root / "tiny-imagenet-200/train"))[1] / "images"
    bad = sorted(bad.iterdir())[2]
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG
    with pytest.raises(DataFormatError, match=f"{bad.name}: cannot decode image"):
        load_dataset("tinyimagenet", root, store_dir=str(tmp_path / "st"))


# ------------------------------------------------------------------------------------ store


def _tiny_store(trees: Path, tmp_path: Path, **kw) -> Path:
    path = tmp_path / "store"
    prepare_dataset("tinyimagenet", trees, store_dir=str(path), **kw)
    return path


def test_store_refuses_other_resolution_and_other_data(trees, tmp_path):
    path = _tiny_store(trees, tmp_path)
    with pytest.raises(StoreMismatchError, match="holds 64 px images, this run asks for 48 px"):
        load_dataset("tinyimagenet", trees, store_dir=str(path), image_size=48)
    root = _copy(trees, "tiny-imagenet-200", tmp_path)
    extra = root / "tiny-imagenet-200/train/n01440764/images/n01440764_0.JPEG"
    shutil.copy(extra, extra.with_name("n01440764_extra.JPEG"))
    with pytest.raises(StoreMismatchError, match="built from other data"):
        load_dataset("tinyimagenet", root, store_dir=str(path))
    with pytest.raises(StoreMismatchError, match="a store of dataset 'tinyimagenet', this run asks for 'cub200'"):
        load_dataset("cub200", trees, store_dir=str(path))
    with pytest.raises(StoreMismatchError, match="not empty and not a fusionkd store"):
        load_dataset("tinyimagenet", trees, store_dir=str(trees / "CUB_200_2011"))


def test_store_refuses_truncated_missing_and_corrupt_shards(trees, tmp_path):
    path = _tiny_store(trees, tmp_path)
    shard = path / "train-00000.u8"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(StoreError, match=r"train-00000.u8: truncated or damaged shard: \d+ bytes, the manifest says"):
        load_dataset("tinyimagenet", trees, store_dir=str(path))
    shard.unlink()
    with pytest.raises(StoreError, match="train-00000.u8: missing shard of split 'train'"):
        Store(path)
    flipped = bytearray(data)
    flipped[12345] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    store = Store(path)  # sizes are right: opening is cheap and passes
    with pytest.raises(StoreError, match="train-00000.u8: corrupt"):
        store.verify()
    assert main(["prepare", "--dataset", "tinyimagenet", f"data_dir={trees}", f"store_dir={path}", "--verify"]) == 2
    (path / "manifest.json").unlink()
    with pytest.raises(StoreError, match="unfinished store"):
        Store(path)


def test_prepare_refuses_a_disk_too_small_before_decoding(trees, tmp_path, capsys):
    small = tmp_path / "small"
    small.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(small)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
    try:  # the store needs 24 x 12,288 bytes = 295 kB
        code = main(["prepare", "--dataset", "tinyimagenet", f"data_dir={trees}", f"store_dir={small / 'st'}"])
        err = capsys.readouterr().err
        assert code == 2 and "the store needs 295 kB more (12,288 bytes per image)" in err, err
        assert not list((small / "st").glob("*.u8"))  # refused before any shard was written
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


def test_store_dataset_opens_a_copied_store_without_the_source(trees, tmp_path):
    path = _tiny_store(trees, tmp_path)
    copy = tmp_path / "elsewhere"
    shutil.copytree(path, copy)
    s = load_dataset("store", store_dir=str(copy), val_fraction=0.25)
    assert s.info.name == "store" and len(s.info.classes) == 3 and s.info.image_size == 64
    # the dataset's own name finds it too when the images are gone
    t = load_dataset("tinyimagenet", tmp_path / "nothing-here", store_dir=str(copy), val_fraction=0.25)
    assert torch.equal(t.train.labels, s.train.labels)


PREPARE_WORKER = r"""
import os, sys, threading
import fusionkd.data.store as st
from fusionkd.cli import main
st.SHARD_BYTES = 4 * 3 * 64 * 64  # 4 images per shard
block_at, ready = int(sys.argv[3]), sys.argv[4]
real = st.decode_image
lock = threading.Lock()
count = [0]
def decode(path, size):
    with lock:
        n = count[0]
        count[0] += 1
    if 0 <= block_at <= n:
        # the first decode of shard block_at // 4: every earlier shard is complete on disk (shards are written
        # one after the other), this one and the later ones never will be. Say so, then hang until killed.
        with open(ready + ".tmp", "w") as f:
            f.write(str(n))
        os.replace(ready + ".tmp", ready)
        threading.Event().wait()
    return real(path, size)
st.decode_image = decode
rc = main(["prepare", "--dataset", "tinyimagenet", "data_dir=" + sys.argv[1], "store_dir=" + sys.argv[2], "workers=2"])
print("decoded", count[0], flush=True)
sys.exit(rc)
"""


def _prepare_proc(trees: Path, store: Path, block_at: int = -1, ready: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    return subprocess.Popen([sys.executable, "-c", PREPARE_WORKER, str(trees), str(store), str(block_at),
                             str(ready or "")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _wait_for(path: Path, proc: subprocess.Popen, deadline_s: float = 300) -> None:
    """Until ``path`` exists; the deadline only guards against a hang (it is never what the test waits for)."""
    end = time.monotonic() + deadline_s
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the process ended (code {proc.returncode}) before {path.name} appeared: {out}{err}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"{path.name} did not appear within {deadline_s} s")
        time.sleep(0.01)


@pytest.mark.slow
def test_prepare_killed_with_sigkill_resumes_to_a_byte_identical_store(tmp_path_factory):
    trees = tmp_path_factory.mktemp("big")
    write_tinyimagenet(trees, classes=3, train_per_class=12, val_per_class=4)  # 48 images, 12 shards
    ref = tmp_path_factory.mktemp("ref") / "store"
    p = _prepare_proc(trees, ref)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert int(out.split("decoded")[-1]) == 48
    for kill_after in (5,):  # mid-way: after 5 of the 12 shards (one point keeps the suite short)
        store = tmp_path_factory.mktemp("killed") / "store"
        ready = store.parent / "ready"
        # the worker hangs at the first image of shard 5 (a known state: shards 0-4 done), then is killed
        p = _prepare_proc(trees, store, block_at=4 * kill_after, ready=ready)
        _wait_for(ready, p)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        assert p.returncode == -signal.SIGKILL
        assert not (store / "manifest.json").exists()
        with pytest.raises(StoreError, match="unfinished store"):
            Store(store)
        assert len(list(store.glob("*-0*.json"))) == kill_after  # exactly the shards finished before the kill
        p = _prepare_proc(trees, store)
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert int(out.split("decoded")[-1]) == 48 - 4 * kill_after  # finished shards are not decoded again
        a, b = _files(ref), _files(store)
        assert a.keys() == b.keys()
        for name in a:
            assert a[name] == b[name], name


# ------------------------------------------------------------------------------------ loader


def test_store_loader_serves_what_the_memory_loader_serves(trees, tmp_path):
    s = load_dataset("tinyimagenet", trees, store_dir=str(tmp_path / "st"), val_fraction=0.2)
    mem = ArrayDataset(torch.from_numpy(s.train.read(np.arange(len(s.train)))), s.train.labels)
    kw = dict(train=True, crop_padding=4, padding_mode="reflect", cutout=8, seed=5, rank=1, world_size=2)
    a = StoreLoader(s.train, s.info, 3, workers=2, **kw)
    b = DeviceLoader(mem, s.info, 3, **kw)
    reads0 = s.train.reads
    for epoch in (0, 3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        pairs = list(zip(a, b, strict=True))
        assert len(pairs) == len(b) > 0
        for (xa, ya), (xb, yb) in pairs:
            assert torch.equal(ya, yb) and torch.equal(xa, xb)
    assert s.train.reads - reads0 == 2 * len(a) * 3  # this rank read only the images it served
    ev = list(StoreLoader(s.test, s.info, 4, train=False))
    ref = list(DeviceLoader(ArrayDataset(torch.from_numpy(s.test.read(np.arange(6))), s.test.labels), s.info, 4,
                            train=False))
    assert all(torch.equal(x, y) and torch.equal(lx, ly) for (x, lx), (y, ly) in zip(ev, ref, strict=True))


def _torchvision_rrc_reference(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Area fractions and aspect ratios of ``RandomResizedCrop.get_params`` (torchvision's loop, one sample
    at a time, scale (0.08, 1), ratio (3/4, 4/3)) on a square image."""
    rng = np.random.default_rng(1)
    areas, ratios = [], []
    for _ in range(n):
        for _ in range(10):
            target = size * size * rng.uniform(0.08, 1.0)
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
            if 0 < w <= size and 0 < h <= size:
                break
        else:
            w = h = size
        areas.append(w * h / size ** 2)
        ratios.append(w / h)
    return np.array(areas), np.array(ratios)


def test_random_resized_crop_geometry():
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (4, 3, 48, 48), dtype=np.uint8))  # noise: the hardest case
    top, left = torch.tensor([0, 5, 10, 3]), torch.tensor([0, 7, 2, 20])
    height, width = torch.tensor([48, 30, 17, 25]), torch.tensor([48, 36, 20, 25])  # whole, shrink, enlarge, equal
    flips = torch.tensor([False, True, False, True])
    out = resized_crop(x, top, left, height, width, flips, 24)
    assert out.dtype == torch.uint8 and out.shape == (4, 3, 24, 24)
    for b in range(4):  # Pillow's crop + bilinear resize (what torchvision's PIL path does), then the mirror
        t, lft, h, w = int(top[b]), int(left[b]), int(height[b]), int(width[b])
        im = Image.fromarray(x[b].permute(1, 2, 0).numpy()).crop((lft, t, lft + w, t + h))
        ref = np.asarray(im.resize((24, 24), Image.BILINEAR)).astype(int)
        ref = ref[:, ::-1] if flips[b] else ref
        assert np.abs(out[b].permute(1, 2, 0).numpy().astype(int) - ref).max() <= 1, b  # rounding only
    same = resized_crop(x, top * 0, left * 0, height * 0 + 48, width * 0 + 48, flips, 48)
    assert torch.equal(same[0], x[0]) and torch.equal(same[1], x[1].flip(-1))
    d = draw_resized_crops(5000, 64, generator=g)
    area = (d.height * d.width).double() / 64 ** 2
    ratio = d.width.double() / d.height.double()
    ref_area, ref_ratio = _torchvision_rrc_reference(5000, 64)
    assert area.min() >= 0.07 and area.max() <= 1.0 and abs(area.mean() - ref_area.mean()) < 0.015
    assert ratio.min() >= 0.7 and ratio.max() <= 1.45 and abs(ratio.mean() - ref_ratio.mean()) < 0.015
    assert (d.top >= 0).all() and (d.top + d.height <= 64).all() and (d.left + d.width <= 64).all()
    assert 0.45 < d.flips.float().mean() < 0.55
    again = draw_resized_crops(5000, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.top, d.top) and torch.equal(again.width, d.width)


def test_random_resized_loader_and_centre_crop_eval(trees, tmp_path):
    s = load_dataset("cub200", trees, val_fraction=0, image_size=32, store_dir=str(tmp_path / "st"))
    tr = StoreLoader(s.train, s.info, 4, train=True, seed=1)
    batches = [x for x, _ in tr]
    again = [x for x, _ in (tr.set_epoch(0) or tr)]
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))  # a function of (seed, epoch)
    tr.set_epoch(1)
    assert not torch.equal(next(iter(tr))[0], batches[0])
    assert batches[0].shape == (4, 3, 32, 32)
    ev = next(iter(StoreLoader(s.test, s.info, 6, train=False)))[0]
    raw = torch.from_numpy(s.test.read(np.arange(6)))[:, :, 2:34, 2:34].float()  # 37 px stored: centre 32
    mean = torch.tensor(s.info.mean).view(1, 3, 1, 1)
    std = torch.tensor(s.info.std).view(1, 3, 1, 1)
    assert torch.allclose(ev, (raw / 255 - mean) / std, atol=1e-5)
    with pytest.raises(ValueError, match="crop='pad' serves the stored 37 px images at their own size"):
        StoreLoader(s.train, s.info, 4, train=True, crop="pad")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("crop", ["pad", "random-resized"])
def test_store_loader_cuda_matches_cpu(trees, tmp_path, crop):
    size = 64 if crop == "pad" else 32
    s = load_dataset("tinyimagenet", trees, store_dir=str(tmp_path / "st"), image_size=size, crop=crop,
                     val_fraction=0)
    kw = dict(train=True, seed=2, cutout=8)
    cpu = list(StoreLoader(s.train, s.info, 4, **kw))
    gpu = list(StoreLoader(s.train, s.info, 4, device="cuda", **kw))
    tol = 1e-4 if crop == "pad" else 1.01 / (255 * min(s.info.std))  # resize: one grey level of rounding
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert torch.equal(yc, yg.cpu()) and torch.allclose(xc, xg.cpu(), atol=tol)


# ---------------------------------------------------------------------------------- training


def test_train_cli_tinyimagenet_and_exact_resume(trees, tmp_path):
    flags = ["train", "--dataset", "tinyimagenet", "--epochs", "2", "--batch-size", "4", "--eval-batch-size", "8",
             "--progress", "none", "--threads", "1", "--out-dir", str(tmp_path / "runs")]
    kv = [f"data_dir={trees}", f"dataset_options.store_dir={tmp_path / 's'}", "val_fraction=0.2", "augment.cutout=8",
          "augment.mixup=0.4", "augment.cutmix=1.0"]  # mixing on the store resumes exactly too
    assert main(flags + ["--name", "full"] + kv) == 0
    assert main(flags + ["--name", "part", "--stop-after", "1"] + kv) == 0
    assert main(["train", "--resume", str(tmp_path / "runs/part")]) == 0
    a = load_checkpoint(tmp_path / "runs/full/last.pt")["method_state"]
    b = load_checkpoint(tmp_path / "runs/part/last.pt")["method_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full = [json.loads(x) for x in (tmp_path / "runs/full/metrics.jsonl").read_text().splitlines()]
    part = [json.loads(x) for x in (tmp_path / "runs/part/metrics.jsonl").read_text().splitlines()]
    assert [(m["val"], m.get("test")) for m in full] == [(m["val"], m.get("test")) for m in part]


@pytest.mark.parametrize("name,where", [("cub200", "."), ("imagenet", "devkit/imagenet")])
def test_train_cli_cub200_and_imagenet(trees, tmp_path, name, where):
    args = ["train", "--dataset", name, "--epochs", "1", "--batch-size", "4", "--eval-batch-size", "8",
            "--image-size", "32", "--progress", "none", "--threads", "1", "--out-dir", str(tmp_path / "runs"),
            f"data_dir={trees / where}", f"dataset_options.store_dir={tmp_path / 's'}", "val_fraction=0.2",
            "augment.cutout=8"]
    assert main(args) == 0
    summary = json.loads(next((tmp_path / "runs").rglob("summary.json")).read_text())
    assert summary["finished"] is True and (tmp_path / "s/manifest.json").is_file()


def test_train_api_imagenet_and_compare_cub200(trees, tmp_path):
    r = fusionkd.train(method="baseline", model="resnet20", dataset="imagenet", data_dir=str(trees / "csv/imagenet"),
                       image_size=32, dataset_options={"store_dir": str(tmp_path / "in")}, epochs=1, batch_size=4,
                       eval_batch_size=8, val_fraction=0.2, progress="none", threads=1, out_dir=str(tmp_path / "r"))
    assert r.last_test_accuracy is not None and (tmp_path / "in/manifest.json").is_file()
    res = fusionkd.evaluate_checkpoint(r.run_dir / "best.pt")
    assert res is not None
    # predict prepares a photo as evaluation does: the store's 37 px square, centre-cropped to 32
    ckpt = load_checkpoint(r.run_dir / "best.pt")
    assert ckpt["data"]["stored_size"] == 37 and ckpt["data"]["image_size"] == 32
    s = load_dataset("imagenet", trees / "csv/imagenet", image_size=32, store_dir=str(tmp_path / "in"), val_fraction=0)
    x, _ = next(iter(StoreLoader(s.test, s.info, 1, train=False)))
    photo = sorted((trees / "csv/imagenet/ILSVRC/Data/CLS-LOC/val").glob("*.JPEG"))[0]
    net = r.load_deploy_model().eval()
    with torch.inference_mode():
        want = net(x).softmax(1)[0]
    got = fusionkd.predict(r.run_dir / "best.pt", [photo], topk=3)[0]["top"]
    for entry in got:
        assert entry["probability"] == pytest.approx(float(want[s.info.classes.index(entry["class"])]), abs=1e-5)
    args = ["compare", "--methods", "baseline,kd", "--models", "resnet20", "--dataset", "cub200",
            "--out", str(tmp_path / "cmp"), "--teacher-model", "resnet20", "--teacher-epochs", "1",
            f"data_dir={trees}", "image_size=32", f"dataset_options.store_dir={tmp_path / 'cub'}", "epochs=1",
            "batch_size=4", "eval_batch_size=8", "val_fraction=0.2"]
    args[1:1] = ["--threads", "1"]
    assert main(args) == 0
    assert (tmp_path / "cmp/results.csv").is_file()


# ------------------------------------------------------------------------------------- torchrun


def _torchrun(args: list[str]) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    cmd = [torchrun, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE.parent / 'src'}{os.pathsep}{HERE}"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_ranks_read_only_their_share_of_one_store(trees, tmp_path):
    store = tmp_path / "store"
    out = tmp_path / "out"
    out.mkdir()
    _torchrun([str(HERE / "store_rank_worker.py"), str(trees), str(store), str(out)])  # both ranks race to prepare
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    s = load_dataset("tinyimagenet", trees, store_dir=str(store), val_fraction=0.25)
    n = len(s.train)
    # each stored image's per-channel sums after normalisation: what identifies a served sample
    raw = s.train.read(np.arange(n)).astype(np.float64).sum((2, 3))  # (n, 3)
    side = s.info.image_size
    want = (raw / 255 - side * side * np.asarray(s.info.mean)) / np.asarray(s.info.std)
    gaps = np.abs(want[:, None] - want[None]).max(-1) + np.eye(n) * 1e9
    assert gaps.min() > 1.0  # every image is told apart by its sums

    def identify(sums: list[list[float]]) -> list[int]:
        d = np.abs(np.asarray(sums)[:, None] - want[None]).max(-1)  # (served, n)
        idx = d.argmin(1)
        assert d[np.arange(len(idx)), idx].max() < 1e-2, "a served sample is no stored image (flipped or not)"
        return idx.tolist()

    used = 2 * ranks[0]["batches"]  # samples per rank and epoch (batch 2, drop_last)
    assert ranks[1]["batches"] == ranks[0]["batches"] and 0 < used <= n // 2
    for epoch in range(2):
        # the epoch's permutation (one process, nothing dropped); rank r's share: positions r, r + 2, ...
        perm = StoreLoader(s.train, s.info, 2, train=True, seed=7, drop_last=False).plan(epoch)[0].tolist()
        assert sorted(perm) == list(range(n))
        served = [identify(r["epochs"][epoch]["sums"]) for r in ranks]
        for r in range(2):
            assert served[r] == perm[r::2][:used]  # in the permutation's order
            assert ranks[r]["epochs"][epoch]["labels"] == s.train.labels[served[r]].tolist()
            assert ranks[r]["epochs"][epoch]["read"] == served[r]  # it read exactly what it served
        assert not set(served[0]) & set(served[1])  # disjoint
        assert set(served[0]) | set(served[1]) == set(perm[:2 * used])  # together: the epoch's share
    for r in ranks:  # each rank read exactly the images of its own batches, nothing else
        assert r["reads"] == 2 * r["batches"] * 2
    # and a real DDP training run on the store: parameters stay identical on both ranks
    settings = dict(model="resnet20", dataset="tinyimagenet", data_dir=str(trees), val_fraction=0.25, batch_size=4,
                    eval_batch_size=8, dataset_options={"store_dir": str(store)}, epochs=1, lr=0.05,
                    schedule="constant", progress="none", threads=1, seed=3, out_dir=str(tmp_path / "runs"))
    _torchrun([str(HERE / "ddp_worker.py"), json.dumps(settings), str(out)])
    p0, p1 = (torch.load(out / f"rank{r}.pt", weights_only=True)["params"] for r in range(2))
    assert p0.keys() == p1.keys() and all(torch.equal(p0[k], p1[k]) for k in p0)


def test_imagenet_preset_trains_on_the_official_layout(trees, tmp_path):
    # the shipped frskd-imagenet preset, shrunk: its dataset, random-resized crop and normalisation are kept
    r = fusionkd.train(config="frskd-imagenet", data_dir=str(trees / "csv/imagenet"), model="resnet20",
                       image_size=32, epochs=1, milestones=None, batch_size=4, eval_batch_size=8, val_fraction=0.2,
                       dataset_options={"store_dir": str(tmp_path / "in")}, progress="none", threads=1,
                       out_dir=str(tmp_path / "r"), name="preset")
    s = r.summary
    assert s["finished"] and s["method"] == "frskd" and s["dataset"] == "imagenet"
    assert load_checkpoint(r.run_dir / "last.pt")["config"]["normalize"] == "imagenet"


def test_randaugment_on_a_store_is_refused_with_the_reason(trees, tmp_path):
    with pytest.raises(ValueError, match="randaugment is not available for data read from a store"):
        fusionkd.train(method="baseline", model="resnet20", dataset="imagenet", data_dir=str(trees / "csv/imagenet"),
                       image_size=32, dataset_options={"store_dir": str(tmp_path / "in")}, epochs=1, batch_size=4,
                       val_fraction=0.2, progress="none", threads=1, out_dir=str(tmp_path / "r"),
                       augment={"randaugment": 2}, name="ra")
    assert not (tmp_path / "r" / "ra").exists()  # a refusal leaves no run folder behind


def test_mixing_store_loader_refusals(trees, tmp_path):
    """MixUp/CutMix on a store wrap the loader; its bad settings are refused with the values named, and it
    cannot be iterated before an epoch is set (its draws depend on (seed, epoch))."""
    from fusionkd.data.store_loader import MixingStoreLoader, make_loader

    s = load_dataset("cub200", trees, val_fraction=0, image_size=32, store_dir=str(tmp_path / "st"))
    inner = StoreLoader(s.train, s.info, 4, train=True, seed=1)
    for kw, match in [(dict(mixup=-0.1, cutmix=0.0, mix_prob=1.0), "mixup=-0.1"),
                      (dict(mixup=0.2, cutmix=-1.0, mix_prob=1.0), "cutmix=-1.0"),
                      (dict(mixup=0.2, cutmix=0.0, mix_prob=1.5), "mix_prob=1.5")]:
        with pytest.raises(ValueError, match=match):
            MixingStoreLoader(inner, num_classes=3, **kw)
    with pytest.raises(ValueError, match="pass num_classes"):
        make_loader(s.train, s.info, 4, train=True, mixup=0.2)  # soft targets need the class count
    loader = MixingStoreLoader(inner, mixup=0.2, cutmix=0.0, mix_prob=1.0, num_classes=3)
    with pytest.raises(RuntimeError, match="set_epoch"):
        next(iter(loader))
    loader.set_epoch(0)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4, 3) and torch.allclose(y.sum(1), torch.ones(4))
