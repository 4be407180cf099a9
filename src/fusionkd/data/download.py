"""Fetching, verifying and safely extracting official dataset archives.

Network access goes through :func:`open_url` (a module attribute, so tests can replace it) with a short
timeout: on a machine without internet the call fails within seconds with a message that says which
file to fetch and where to put it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import IO

from ..errors import DownloadError

logger = logging.getLogger(__name__)

#: Seconds before a connection attempt (or a stalled read) is abandoned.
TIMEOUT_S = 10.0


def open_url(url: str, timeout: float) -> IO[bytes]:
    """Open ``url`` for reading (``urllib.request.urlopen``); replaced in tests to stay offline."""
    return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - fixed https URLs


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, dest: Path, md5: str, *, manual_hint: str, timeout: float = TIMEOUT_S) -> Path:
    """Download ``url`` to ``dest`` (atomically: a temporary file renamed once its md5 matches).

    Raises:
        DownloadError: network failure (message includes ``manual_hint``) or checksum mismatch.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s -> %s", url, dest)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.part-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with open_url(url, timeout) as resp:
                    while block := resp.read(1 << 20):
                        out.write(block)
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise DownloadError(
                    f"could not download {url} ({e}); this machine may have no internet access. {manual_hint}"
                ) from e
        got = md5sum(tmp)
        if got != md5:
            raise DownloadError(
                f"{url}: md5 {got} does not match the official {md5}; the download is corrupt. {manual_hint}"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def verify(archive: Path, md5: str, *, manual_hint: str) -> None:
    got = md5sum(archive)
    if got != md5:
        raise DownloadError(f"{archive}: md5 {got} does not match the official {md5}; the archive is corrupt "
                            f"or not the official one. Delete it. {manual_hint}")


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive into ``dest``, refusing anything that could write outside it.

    Only regular files and directories are extracted; absolute names, ``..`` components, links and
    device files raise :class:`DownloadError` before anything is written.
    """
    dest = dest.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                refuse = f"{archive}: refusing member {m.name!r}:"
                name = PurePosixPath(m.name)
                if name.is_absolute() or ".." in name.parts or m.name.startswith(("/", "\\")):
                    raise DownloadError(f"{refuse} path leaves the target folder")
                if not (m.isfile() or m.isdir()):
                    raise DownloadError(f"{refuse} not a regular file or folder")
                target = (dest / m.name).resolve()
                if target != dest and dest not in target.parents:
                    raise DownloadError(f"{refuse} path leaves the target folder")
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: belt and braces
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - older Pythons; members were checked above
                tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DownloadError(f"{archive}: cannot extract ({e}); the archive is corrupt, delete it") from e
