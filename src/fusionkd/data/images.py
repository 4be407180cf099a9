"""Folders of PNG/JPEG image files: listing them, the checks every image file goes through before it is
opened, and decoding.

* Folders of PNG/JPEG files ``<split>/<class>/*.png``: :func:`scan_image_tree`, :func:`decode_images`.
* The checks every image file goes through before it is opened: :func:`regular_file_stat` (regular files
  only: no named pipe, device, socket, folder or looping symbolic link), :func:`open_image` (the same, race
  free, plus the pixel limit :func:`max_image_pixels` against decompression bombs).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import re
import stat
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataFormatError

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- image trees

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


@dataclass(frozen=True)
class ImageFile:
    """One image of a ``<split>/<class>/<file>`` tree."""

    path: Path
    label: int
    size: int
    mtime_ns: int


# ------------------------------------------------------------------------------ hostile or odd files

#: environment variable that sets the largest image (width x height, in pixels) that is decoded
MAX_PIXELS_ENV = "FUSIONKD_MAX_IMAGE_PIXELS"

_ONLY_REGULAR = ("only regular image files (or symbolic links to them) are read; remove it or replace it with "
                 "the image file")
#: serialises the few microseconds of ``Image.open`` (header parsing only) during which Pillow's global pixel
#: limit and the warning filters are adjusted; the decoding itself runs outside it, in parallel
_OPEN_LOCK = threading.Lock()


def max_image_pixels() -> int | None:
    """The largest image (width x height, in pixels) that is decoded: ``$FUSIONKD_MAX_IMAGE_PIXELS`` when set,
    else Pillow's ``PIL.Image.MAX_IMAGE_PIXELS`` (89,478,485 in Pillow 13 unless a program changed it; None:
    no limit).

    Raises:
        ValueError: the variable is set to something other than a positive whole number.
    """
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if raw:
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"{MAX_PIXELS_ENV}={raw!r}: expected a positive whole number of pixels (width x "
                             "height), e.g. 400000000")
        return value
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS


def _unreadable(path: Path, e: OSError) -> DataFormatError:
    """The refusal for an ``OSError`` of ``stat``/``open`` on ``path``, in words."""
    if e.errno == errno.ELOOP:
        what = "a symbolic link that loops (it points to itself, or through other links back to itself)"
    elif e.errno == errno.ENOENT and os.path.islink(path):
        what = f"a symbolic link to {os.readlink(path)!r}, which does not exist"
    elif e.errno == errno.ENOENT:
        return DataFormatError(f"{path}: no such file")
    elif e.errno in (errno.EACCES, errno.EPERM):
        return DataFormatError(f"{path}: cannot be read (permission denied); make it readable by this user")
    else:
        what = f"cannot be read ({e.strerror or e})"
    return DataFormatError(f"{path}: {what}; {_ONLY_REGULAR}")


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words, from its ``st_mode``: "a named pipe (FIFO)", "a socket", ..."""
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "a special file"


def regular_file_stat(path: Path, entry: os.DirEntry | None = None) -> os.stat_result:
    """``stat`` of ``path`` (following symbolic links; from ``entry`` when given), refusing anything that is not a
    regular file. Nothing is opened, so a named pipe cannot block and a device file is never touched.

    Raises:
        DataFormatError: a named pipe, socket, device or folder; a symbolic link that loops or whose target is
            missing; a file that cannot be stat'ed. The message names the file and says what is read.
    """
    try:
        st = entry.stat() if entry is not None else os.stat(path)
    except OSError as e:
        raise _unreadable(path, e) from None
    if not stat.S_ISREG(st.st_mode):
        raise DataFormatError(f"{path}: {file_kind(st.st_mode)}, not a regular file; {_ONLY_REGULAR}")
    return st


def open_regular(path: Path) -> io.BufferedReader:
    """``open(path, "rb")`` for a regular file only, without ever blocking: the file is opened non-blocking
    (a named pipe without a writer then opens at once instead of waiting forever), checked with ``fstat`` on
    the open descriptor (so a file swapped for a pipe after a directory scan is still refused), and only
    then switched back to blocking reads.

    Raises:
        DataFormatError: see :func:`regular_file_stat`.
    """
    path = Path(path)
    regular_file_stat(path)  # refuse devices before opening them at all
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise _unreadable(path, e) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise DataFormatError(f"{path}: {file_kind(mode)}, not a regular file; {_ONLY_REGULAR}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _bomb_pixels(e: Exception) -> str:
    """The pixel count in Pillow's ``DecompressionBombError`` message, formatted (or "too many")."""
    m = re.search(r"\((\d+) pixels\)", str(e))
    return f"{int(m.group(1)):,}" if m else "too many"


def _too_large(path: Path, pixels: str, limit: int) -> DataFormatError:
    return DataFormatError(
        f"{path}: {pixels} pixels, more than the limit of {limit:,} pixels (width x height; a protection against "
        f"decompression bombs, Pillow's PIL.Image.MAX_IMAGE_PIXELS unless {MAX_PIXELS_ENV} is set); shrink the "
        f"image, or raise the limit with the environment variable {MAX_PIXELS_ENV}=<pixels>"
    )


@contextlib.contextmanager
def open_image(path: Path) -> Iterator[Any]:
    """A Pillow image of the regular file ``path`` (header read, pixels not yet decoded), closed on exit.

    Images larger than :func:`max_image_pixels` are refused, whatever their file size (a 30000x30000 1-bit PNG
    is 110 kB): Pillow's own check, which only warns between its limit and twice it, is held to the one
    limit here, so every image above it is refused and none below it is.

    Raises:
        DataFormatError: not a regular file (see :func:`open_regular`), too many pixels, or not an image Pillow
            can identify; the message names the file.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    limit = max_image_pixels()
    fh = open_regular(path)
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with the file named
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = limit
            try:
                im = Image.open(fh)
            except Image.DecompressionBombError as e:  # more than twice the limit: Pillow refuses it itself
                raise _too_large(path, _bomb_pixels(e), limit or 0) from None
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
                raise DataFormatError(f"{path}: cannot decode image ({e}); remove or replace the file") from e
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        with im:
            w, h = im.size
            if limit is not None and w * h > limit:
                raise _too_large(path, f"{w}x{h} = {w * h:,}", limit)
            yield im
    finally:
        fh.close()


def list_folder(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder``, or a :class:`DataFormatError` naming it when it cannot be listed."""
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            why = "permission denied; make it readable by this user (e.g. chmod a+rx) or remove it"
        else:
            why = e.strerror or str(e)
        raise DataFormatError(f"{folder}: cannot list the folder ({why}); every data folder must be readable") \
            from None


def _visible_dirs(path: Path) -> list[Path]:
    out = []
    for e in list_folder(path):
        if e.name.startswith("."):
            continue
        try:
            is_dir = e.is_dir()
        except OSError:  # a looping symbolic link: not a class folder
            is_dir = False
        if is_dir:
            out.append(Path(e.path))
    return sorted(out)


def list_classes(split_dir: Path) -> list[str]:
    """Sorted names of the class sub-folders of ``split_dir`` (hidden folders ignored).

    Raises:
        DataFormatError: ``split_dir`` cannot be listed (e.g. permission denied); the message names it.
    """
    return [p.name for p in _visible_dirs(split_dir)]


def scan_image_tree(split_dir: Path, classes: Sequence[str], *, require_all: bool = True) -> list[ImageFile]:
    """All images of ``split_dir/<class>/*.{png,jpg,jpeg}`` (extension case-insensitive), sorted by class,
    then file name. Hidden files and other extensions are ignored; an entry with an image extension must be a
    regular file (or a symbolic link to one): see :func:`regular_file_stat`.

    Args:
        require_all: every class of ``classes`` must have a folder with at least one image (training
            splits); otherwise missing or empty class folders are allowed (evaluation splits).

    Raises:
        DataFormatError: a class folder is not one of ``classes``; with ``require_all``, a class folder is
            missing or holds no image; a folder cannot be listed; an image entry is not a regular file.
    """
    index = {c: i for i, c in enumerate(classes)}
    found = list_classes(split_dir)
    unknown = [c for c in found if c not in index]
    if unknown:
        raise DataFormatError(
            f"{split_dir}: class folders {unknown} are not among the classes {list(classes)} "
            "(the class list comes from the train split)"
        )
    files: list[ImageFile] = []
    for cls in classes:
        cdir = split_dir / cls
        if not cdir.is_dir():
            if not require_all:
                continue
            raise DataFormatError(f"{split_dir}: missing class folder {cls!r}")
        n0 = len(files)
        for e in list_folder(cdir):
            if e.name.startswith(".") or not e.name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            st = regular_file_stat(Path(e.path), e)
            files.append(ImageFile(Path(e.path), index[cls], st.st_size, st.st_mtime_ns))
        if len(files) == n0 and require_all:
            raise DataFormatError(
                f"{cdir}: no images (looked for {', '.join('*' + x for x in IMAGE_EXTENSIONS)})"
            )
    files.sort(key=lambda f: (f.label, f.path.name))
    return files


def fingerprint(parts: Iterable[str], files: Iterable[tuple[str, Sequence[ImageFile]]]) -> str:
    """SHA-256 over ``parts`` (options such as the image size) and, per split, every file's relative
    path, size and modification time: any added, removed, replaced or touched file changes it."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() + b"\0")
    for split, fs in files:
        h.update(f"[{split}]\0".encode())
        for f in fs:
            h.update(f"{f.label}/{f.path.name}\0{f.size}\0{f.mtime_ns}\n".encode())
    return h.hexdigest()


def decode_image(path: Path, image_size: int) -> np.ndarray:
    """One image file as RGB uint8 ``(S, S, 3)``, ``S = image_size``: see :func:`decode_images`.

    Raises:
        DataFormatError: the file cannot be read or decoded, is not a regular file or has more pixels than
            :func:`max_image_pixels` (the message names it).
    """
    return _decode(path, image_size)[0]


def _decode(path: Path, image_size: int) -> tuple[np.ndarray, bool]:
    from PIL import Image

    max_image_pixels()  # a bad $FUSIONKD_MAX_IMAGE_PIXELS is its own error, not the image's
    try:
        with open_image(path) as im:
            gray = im.mode in _GRAY_MODES
            if im.format == "JPEG":  # decode at a reduced DCT scale when the image is >= 2x the target
                w, h = im.size
                s = min(w, h)
                im.draft(im.mode, (max(1, w * image_size // s), max(1, h * image_size // s)))
            if im.mode.startswith("I;16"):  # 16-bit PNG: keep the 8 most significant bits
                im = Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8))
            im = im.convert("RGB")
            w, h = im.size
            if w != h:
                s = min(w, h)
                left, top = (w - s) // 2, (h - s) // 2
                im = im.crop((left, top, left + s, top + s))
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8), gray
    except DataFormatError:
        raise
    except Image.DecompressionBombError as e:  # a later frame (GIF) larger than the first
        raise _too_large(path, _bomb_pixels(e), max_image_pixels() or 0) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataFormatError(f"{path}: cannot decode image ({e}); remove or replace the file") from e


def decode_images(files: Sequence[ImageFile], image_size: int) -> tuple[np.ndarray, bool]:
    """Decode ``files`` with Pillow into RGB uint8 ``(N, 3, S, S)``, ``S = image_size``.

    Non-square images are centre-cropped to their largest square first; images of another size are
    resized with bilinear filtering (Pillow's resize, antialiased when shrinking). JPEGs at least twice
    the target size are first decoded at a reduced DCT scale (Pillow's ``draft``; much faster for
    ImageNet-sized photos).

    Returns:
        ``(images, all_gray)``: ``all_gray`` is True when every file was single-channel (Pillow modes
        ``1``, ``L``, ``LA``, ``I``, ``I;16``, ``F``), in which case the three channels are identical.
        16-bit images keep their 8 most significant bits.
    """
    out = np.empty((len(files), image_size, image_size, 3), dtype=np.uint8)
    all_gray = True
    for i, f in enumerate(files):
        out[i], gray = _decode(f.path, image_size)
        all_gray &= gray
        if (i + 1) % 20000 == 0:
            logger.info("decoded %d / %d images", i + 1, len(files))
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2)), all_gray
