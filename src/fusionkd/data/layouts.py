"""Readers of official on-disk layouts: each lists a dataset's image files and labels, nothing else.

Every reader returns a :class:`FileSplits` (image files per split, in a fixed order, and the class names);
decoding, caching and the store are shared by all of them (``datasets._materialise``). Every file the
layout names must exist; a listed file that is missing, a label outside the classes or a malformed line
raises :class:`~fusionkd.data.DataFormatError` naming the file and line. Every image goes through the same file
check as an image folder's (:func:`~fusionkd.data.formats.regular_file_stat`: regular files only, no named
pipe, device or looping link), and an unreadable folder is refused by name.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .formats import DataFormatError, ImageFile, list_folder, open_regular, regular_file_stat

__all__ = ["FileSplits", "find_imagenet_root", "read_cub200", "read_imagenet", "read_tinyimagenet"]


@dataclass
class FileSplits:
    """Image files of a dataset, per split (``train``, ``test`` and, when the dataset ships one, ``val``)."""

    root: Path
    classes: list[str]
    splits: dict[str, list[ImageFile]] = field(default_factory=dict)


def _image_file(path: Path, label: int, where: str) -> ImageFile:
    """A listed image, which must exist and be a regular file (:func:`~fusionkd.data.formats.regular_file_stat`)."""
    if not os.path.lexists(path):
        raise DataFormatError(f"{path}: listed by {where} but missing; the extraction is incomplete")
    st = regular_file_stat(path)
    return ImageFile(path, label, st.st_size, st.st_mtime_ns)


def _scan_dir(folder: Path, label: int, exts: tuple[str, ...]) -> list[ImageFile]:
    """The images of ``folder`` with one of ``exts`` (hidden ones ignored), sorted by name; every such entry
    must be a regular file (or a symbolic link to one), and an unreadable folder is refused by name."""
    out = []
    for e in list_folder(folder):
        if e.name.startswith(".") or not e.name.lower().endswith(exts):
            continue
        st = regular_file_stat(Path(e.path), e)
        out.append(ImageFile(Path(e.path), label, st.st_size, st.st_mtime_ns))
    out.sort(key=lambda f: f.path.name)
    return out


def _read_text(path: Path) -> str:
    """A UTF-8 text file of the layout (a regular file only: :func:`~fusionkd.data.formats.open_regular`)."""
    try:
        with open_regular(path) as f:
            return f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: cannot read ({e})") from e
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read ({e.strerror or e})") from e


def _subfolders(folder: Path) -> list[Path]:
    """The visible sub-folders of ``folder``, sorted (an unreadable folder is refused by name)."""
    return [Path(e.path) for e in sorted(list_folder(folder), key=lambda e: e.name)
            if not e.name.startswith(".") and _is_dir(e)]


def _is_dir(e: os.DirEntry) -> bool:
    try:
        return e.is_dir()
    except OSError:  # a looping symbolic link is not a folder
        return False


def _lines(path: Path) -> Iterable[tuple[int, list[str]]]:
    """Non-empty lines of a text file as ``(line number, whitespace-split fields)``."""
    text = _read_text(path)
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield n, line.split()


# ------------------------------------------------------------------------------------ TinyImageNet

TINY_FOLDER = "tiny-imagenet-200"


def read_tinyimagenet(root: Path) -> FileSplits:
    """``tiny-imagenet-200/``: ``wnids.txt`` (the classes, one WordNet id a line), ``words.txt``
    (``wnid<TAB>names`` for all of WordNet), ``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG`` with
    ``val/val_annotations.txt`` (``file<TAB>wnid<TAB>box``). The official val set becomes ``test`` (the
    official test set has no labels). Classes are the sorted wnids; names come from ``words.txt``."""
    wnids_path = root / "wnids.txt"
    wnids = sorted({f[0] for _, f in _lines(wnids_path)})
    if not wnids:
        raise DataFormatError(f"{wnids_path}: no WordNet ids")
    index = {w: i for i, w in enumerate(wnids)}
    words: dict[str, str] = {}
    words_path = root / "words.txt"
    if words_path.is_file():
        for line in _read_text(words_path).splitlines():
            wnid, _, names = line.partition("\t")
            if wnid in index:
                words[wnid] = names.strip()
    classes = [words.get(w) or w for w in wnids]
    train: list[ImageFile] = []
    for w in wnids:
        folder = root / "train" / w / "images"
        if not folder.is_dir():
            raise DataFormatError(f"{folder}: missing (wnids.txt lists {w}); expected train/<wnid>/images/*.JPEG")
        files = _scan_dir(folder, index[w], (".jpeg", ".jpg", ".png"))
        if not files:
            raise DataFormatError(f"{folder}: no images")
        train += files
    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DataFormatError(f"{ann}: missing; expected the official val/val_annotations.txt")
    test: list[ImageFile] = []
    for n, fields in _lines(ann):
        if len(fields) < 2:
            raise DataFormatError(f"{ann}:{n}: expected 'file<TAB>wnid<TAB>x0 y0 x1 y1', got {' '.join(fields)!r}")
        name, wnid = fields[0], fields[1]
        if wnid not in index:
            raise DataFormatError(f"{ann}:{n}: wnid {wnid!r} is not in wnids.txt")
        test.append(_image_file(root / "val" / "images" / name, index[wnid], str(ann)))
    test.sort(key=lambda f: f.path.name)
    return FileSplits(root, classes, {"train": train, "test": test})


# ----------------------------------------------------------------------------------- CUB-200-2011

CUB_FOLDER = "CUB_200_2011"


def read_cub200(root: Path) -> FileSplits:
    """``CUB_200_2011/``: ``images.txt`` (``id path``), ``image_class_labels.txt`` (``id class_id``, 1-based),
    ``train_test_split.txt`` (``id is_train``), ``classes.txt`` (``class_id name``), ``images/<class>/*.jpg``.
    Class names drop the ``001.`` prefix and turn underscores into spaces."""
    def table(name: str, cast_value=int) -> dict[int, object]:
        path = root / name
        if not path.is_file():
            raise DataFormatError(f"{path}: missing; expected the official CUB-200-2011 file {name}")
        out: dict[int, object] = {}
        for n, fields in _lines(path):
            if len(fields) != 2:
                raise DataFormatError(f"{path}:{n}: expected 2 fields, got {len(fields)}")
            try:
                key, value = int(fields[0]), cast_value(fields[1])
            except ValueError:
                raise DataFormatError(f"{path}:{n}: cannot read {' '.join(fields)!r}") from None
            if key in out:
                raise DataFormatError(f"{path}:{n}: id {key} appears twice")
            out[key] = value
        return out

    class_table = table("classes.txt", str)
    ids = sorted(class_table)
    if ids != list(range(1, len(ids) + 1)):
        raise DataFormatError(f"{root / 'classes.txt'}: class ids must be 1..{len(ids)}")
    classes = [str(class_table[i]).split(".", 1)[-1].replace("_", " ") for i in ids]
    images = table("images.txt", str)
    labels = table("image_class_labels.txt")
    is_train = table("train_test_split.txt")
    for name, t in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train)):
        if set(t) != set(images):
            missing = sorted(set(images) - set(t))[:5]
            extra = sorted(set(t) - set(images))[:5]
            raise DataFormatError(f"{root / name}: its image ids differ from images.txt (missing {missing}, "
                                  f"unknown {extra})")
    splits: dict[str, list[ImageFile]] = {"train": [], "test": []}
    for i in sorted(images):
        label = int(labels[i])  # type: ignore[arg-type]
        if not 1 <= label <= len(classes):
            raise DataFormatError(f"{root / 'image_class_labels.txt'}: image {i} has class {label}, outside "
                                  f"1..{len(classes)}")
        if is_train[i] not in (0, 1):
            raise DataFormatError(f"{root / 'train_test_split.txt'}: image {i} has {is_train[i]}, expected 0 or 1")
        split = "train" if is_train[i] == 1 else "test"
        splits[split].append(_image_file(root / "images" / str(images[i]), label - 1, "images.txt"))
    if not splits["train"] or not splits["test"]:
        raise DataFormatError(f"{root / 'train_test_split.txt'}: needs both training (1) and test (0) images")
    return FileSplits(root, classes, splits)


# ---------------------------------------------------------------------------------------- ImageNet

IMAGENET_EXTS = (".jpeg", ".jpg", ".png")
VAL_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"


def find_imagenet_root(candidate: Path) -> Path | None:
    """``candidate`` itself when it holds ``train/`` and ``val/``, or the Kaggle layout's
    ``ILSVRC/Data/CLS-LOC/`` inside it."""
    for root in (candidate, candidate / "ILSVRC" / "Data" / "CLS-LOC"):
        if (root / "train").is_dir() and (root / "val").is_dir():
            return root
    return None


def _upwards(root: Path, name: str, levels: int = 3) -> Path | None:
    p = root
    for _ in range(levels + 1):
        for cand in (p / name, p / "ILSVRC2012_devkit_t12" / "data" / name):
            if cand.is_file():
                return cand
        p = p.parent
    return None


def _devkit_wnids(meta_path: Path) -> list[str]:
    """The devkit's ILSVRC2012_ID (1-based) -> wnid order of the 1000 leaf synsets, from ``meta.mat``."""
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise ImportError(f"reading {meta_path} needs scipy (pip install scipy); or sort val/ into <wnid>/ folders, "
                          "or use the LOC_val_solution.csv layout") from e
    try:
        synsets = loadmat(str(meta_path), squeeze_me=True)["synsets"]
        rows = [(int(s["ILSVRC2012_ID"]), str(s["WNID"]), int(s["num_children"])) for s in synsets]
    except (KeyError, ValueError, TypeError, OSError) as e:
        raise DataFormatError(f"{meta_path}: not the ILSVRC2012 devkit's meta.mat ({e})") from e
    leaves = sorted((i, w) for i, w, c in rows if c == 0)
    return [w for _, w in leaves]


def _imagenet_names(root: Path, wnids: list[str]) -> list[str]:
    mapping = _upwards(root, "LOC_synset_mapping.txt")
    names: dict[str, str] = {}
    if mapping is not None:
        for line in _read_text(mapping).splitlines():
            wnid, _, rest = line.partition(" ")
            names[wnid] = rest.strip()
    return [names.get(w) or w for w in wnids]


def read_imagenet(root: Path) -> FileSplits:
    """ILSVRC-2012: ``train/<wnid>/*.JPEG``; ``val/`` either sorted into ``val/<wnid>/`` folders, or flat
    ``val/*.JPEG`` labelled by ``LOC_val_solution.csv`` (Kaggle: ``ImageId,PredictionString``, the first
    token is the wnid) or by the devkit's ``data/ILSVRC2012_validation_ground_truth.txt`` (one ILSVRC2012_ID
    a line, in file-name order, mapped to wnids by ``data/meta.mat``, which needs scipy). Both files are
    looked up in ``root`` and up to three folders above it, directly or in ``ILSVRC2012_devkit_t12/data/``.
    Classes are the sorted train wnids (names from ``LOC_synset_mapping.txt`` when present); the official
    val set is the test split."""
    wnids = [p.name for p in _subfolders(root / "train")]
    if not wnids:
        tars = list((root / "train").glob("n*.tar"))
        hint = (f"; it holds {len(tars)} per-class .tar files: extract each into train/<wnid>/ (e.g. "
                "`for f in *.tar; do mkdir ${f%.tar}; tar -xf $f -C ${f%.tar}; done`)") if tars else ""
        raise DataFormatError(f"{root / 'train'}: no <wnid> class folders{hint}")
    index = {w: i for i, w in enumerate(wnids)}
    train: list[ImageFile] = []
    for w in wnids:
        files = _scan_dir(root / "train" / w, index[w], IMAGENET_EXTS)
        if not files:
            raise DataFormatError(f"{root / 'train' / w}: no images")
        train += files
    val_dir = root / "val"
    sub = _subfolders(val_dir)
    test: list[ImageFile] = []
    if sub:
        unknown = [p.name for p in sub if p.name not in index]
        if unknown:
            raise DataFormatError(f"{val_dir}: class folders {unknown[:5]} are not train classes")
        for p in sub:
            test += _scan_dir(p, index[p.name], IMAGENET_EXTS)
    else:
        flat = _scan_dir(val_dir, -1, IMAGENET_EXTS)
        if not flat:
            raise DataFormatError(f"{val_dir}: neither <wnid>/ folders nor images")
        by_stem = {f.path.name.rsplit(".", 1)[0]: f for f in flat}
        labels: dict[str, int] = {}
        csv_path = _upwards(root, "LOC_val_solution.csv")
        gt_path = _upwards(root, VAL_GROUND_TRUTH)
        if csv_path is not None:
            with io.StringIO(_read_text(csv_path), newline="") as fh:
                reader = csv.reader(fh)
                header = next(reader, None)
                if not header or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
                    raise DataFormatError(f"{csv_path}: expected the header 'ImageId,PredictionString', got {header}")
                for n, row in enumerate(reader, 2):
                    if len(row) < 2 or not row[1].split():
                        raise DataFormatError(f"{csv_path}:{n}: expected 'ImageId,wnid x0 y0 x1 y1 ...'")
                    wnid = row[1].split()[0]
                    if wnid not in index:
                        raise DataFormatError(f"{csv_path}:{n}: wnid {wnid!r} is not a train class")
                    labels[row[0].strip()] = index[wnid]
            source = csv_path
        elif gt_path is not None:
            meta = gt_path.with_name("meta.mat")
            if not meta.is_file():
                raise DataFormatError(f"{gt_path}: needs the devkit's meta.mat beside it ({meta})")
            order = _devkit_wnids(meta)
            ids = [int(f[0]) for _, f in _lines(gt_path)]
            stems = sorted(by_stem)
            if len(ids) != len(stems):
                raise DataFormatError(f"{gt_path}: {len(ids)} labels for the {len(stems)} images of {val_dir}")
            for stem, i in zip(stems, ids):
                if not 1 <= i <= len(order) or order[i - 1] not in index:
                    raise DataFormatError(f"{gt_path}: ILSVRC2012_ID {i} of {stem} names no train class")
                labels[stem] = index[order[i - 1]]
            source = gt_path
        else:
            raise DataFormatError(
                f"{val_dir}: flat validation images but no labels: put LOC_val_solution.csv (Kaggle) or the devkit's "
                f"ILSVRC2012_devkit_t12/data/{VAL_GROUND_TRUTH} + meta.mat in {root} or a folder above, or sort "
                "val/ into <wnid>/ folders")
        unlabelled = sorted(set(by_stem) - set(labels))
        if unlabelled:
            raise DataFormatError(f"{source}: no label for {len(unlabelled)} image(s) of {val_dir}, e.g. "
                                  f"{unlabelled[0]}")
        missing = sorted(set(labels) - set(by_stem))
        if missing:
            raise DataFormatError(f"{val_dir / missing[0]}.JPEG: labelled by {source} but missing "
                                  f"({len(missing)} missing)")
        test = [ImageFile(f.path, labels[s], f.size, f.mtime_ns) for s, f in sorted(by_stem.items())]
    if not test:
        raise DataFormatError(f"{val_dir}: no validation images")
    return FileSplits(root, _imagenet_names(root, wnids), {"train": train, "test": test})
