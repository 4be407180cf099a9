"""Writers of tiny dataset trees in the official on-disk layouts (TinyImageNet, CUB-200-2011, ImageNet),
with real JPEG files (Pillow), for the tests. Each class has its own colour pattern plus noise, so a short
training run can tell classes apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def class_image(label: int, k: int, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A (width, height) RGB image of class ``label`` (its own coarse pattern), sample ``k`` (noise)."""
    w, h = size
    pattern = np.random.default_rng([seed, label]).integers(30, 226, (4, 4, 3)).astype(np.float32)
    big = np.asarray(Image.fromarray(pattern.astype(np.uint8)).resize((w, h), Image.BILINEAR), np.float32)
    noise = np.random.default_rng([seed, label, k, 7]).integers(-25, 26, (h, w, 3))
    return Image.fromarray(np.clip(big + noise, 0, 255).astype(np.uint8))


def wnid(i: int) -> str:
    return f"n{1440764 + 37 * i:08d}"


def write_tinyimagenet(parent: Path, classes: int = 3, train_per_class: int = 6, val_per_class: int = 2) -> Path:
    root = parent / "tiny-imagenet-200"
    ids = [wnid(i) for i in range(classes)]
    (root / "train").mkdir(parents=True)
    (root / "val" / "images").mkdir(parents=True)
    (root / "test" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in reversed(ids)))  # file order is not label order
    words = [f"{w}\tclass {i}, kind {i}" for i, w in enumerate(ids)] + ["n99999999\tunused entry"]
    (root / "words.txt").write_text("\n".join(words) + "\n")
    for i, w in enumerate(ids):
        folder = root / "train" / w / "images"
        folder.mkdir(parents=True)
        boxes = []
        for k in range(train_per_class):
            class_image(i, k, (64, 64)).save(folder / f"{w}_{k}.JPEG", quality=90)
            boxes.append(f"{w}_{k}.JPEG\t0\t0\t63\t63")
        (root / "train" / w / f"{w}_boxes.txt").write_text("\n".join(boxes) + "\n")
    lines, n = [], 0
    for k in range(val_per_class):
        for i, w in enumerate(ids):
            class_image(i, 100 + k, (64, 64)).save(root / "val" / "images" / f"val_{n}.JPEG", quality=90)
            lines.append(f"val_{n}.JPEG\t{w}\t1\t2\t60\t61")
            n += 1
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    class_image(0, 999, (64, 64)).save(root / "test" / "images" / "test_0.JPEG")  # unlabelled: ignored
    return root


def write_cub200(parent: Path, classes: int = 3, per_class: int = 6) -> Path:
    root = parent / "CUB_200_2011"
    (root / "images").mkdir(parents=True)
    names = [f"{i + 1:03d}.Bird_kind_{i}" for i in range(classes)]
    (root / "classes.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(names)))
    images, labels, split = [], [], []
    n = 0
    for i, name in enumerate(names):
        (root / "images" / name).mkdir()
        for k in range(per_class):
            n += 1
            rel = f"{name}/Bird_Kind_{i}_{k:04d}_{n}.jpg"
            class_image(i, k, (90 + 7 * k, 70 + 3 * i)).save(root / "images" / rel, quality=90)
            images.append(f"{n} {rel}")
            labels.append(f"{n} {i + 1}")
            split.append(f"{n} {0 if k % 3 == 2 else 1}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "bounding_boxes.txt").write_text("")
    return root


def write_imagenet(parent: Path, val_layout: str = "sorted", classes: int = 3, train_per_class: int = 6,
                   val_per_class: int = 2) -> Path:
    """``val_layout``: ``"sorted"`` (val/<wnid>/), ``"csv"`` (Kaggle: flat val/ + LOC_val_solution.csv +
    LOC_synset_mapping.txt, under ILSVRC/Data/CLS-LOC/) or ``"devkit"`` (flat val/ + the devkit's
    ground-truth file and meta.mat)."""
    top = parent / "imagenet"
    root = top / "ILSVRC" / "Data" / "CLS-LOC" if val_layout == "csv" else top
    ids = [wnid(i) for i in range(classes)]
    for i, w in enumerate(ids):
        (root / "train" / w).mkdir(parents=True)
        for k in range(train_per_class):
            class_image(i, k, (80 + 5 * k, 64)).save(root / "train" / w / f"{w}_{k}.JPEG", quality=90)
    (root / "val").mkdir(parents=True, exist_ok=True)
    truth = []
    n = 0
    for k in range(val_per_class):
        for i, w in enumerate(ids):
            n += 1
            stem = f"ILSVRC2012_val_{n:08d}"
            folder = root / "val" / w if val_layout == "sorted" else root / "val"
            folder.mkdir(exist_ok=True)
            class_image(i, 100 + k, (72, 90)).save(folder / f"{stem}.JPEG", quality=90)
            truth.append((stem, i))
    if val_layout == "csv":
        rows = ["ImageId,PredictionString"] + [f"{s},{ids[i]} 1 2 30 40 {ids[i]} 5 5 20 20" for s, i in truth]
        (top / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
        (top / "LOC_synset_mapping.txt").write_text("".join(f"{w} thing {i}, other name\n" for i, w in enumerate(ids)))
    elif val_layout == "devkit":
        from scipy.io import savemat

        data = top / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        # the devkit numbers synsets in its own order (not sorted by wnid): here the reverse, plus one non-leaf
        order = list(reversed(ids))
        dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")]
        rec = np.array([(j + 1, w, f"thing {w}", "", 0) for j, w in enumerate(order)]
                       + [(len(order) + 1, "n00001740", "entity", "", 3)], dtype=dtype)
        savemat(str(data / "meta.mat"), {"synsets": rec})
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text(
            "".join(f"{order.index(ids[i]) + 1}\n" for _, i in sorted(truth)))
    return top
