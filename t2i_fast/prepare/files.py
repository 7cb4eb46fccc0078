"""Opening a source's files as what they claim to be: regular files of bounded size. A FIFO
named like a caption would block the open for ever, and a device such as /dev/zero would be
read until memory runs out."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from t2i_fast.errors import DataError

MAX_CAPTION_BYTES = 1 << 20  # 1 MiB: a caption file holds at most 255 captions
MAX_LIST_BYTES = 64 << 20  # a source's index files: CUB's largest is under 1 MiB
MAX_IMAGE_BYTES = 256 << 20  # far beyond any photograph a text-to-image source holds

_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def open_regular(path: Path, *, limit: int, what: str) -> BinaryIO:
    """``path`` (through links) opened for reading, if it is a regular file of at most
    ``limit`` bytes; else a DataError naming it. ``what`` says what the file should be."""
    try:
        # Non-blocking: a FIFO opens at once instead of waiting for a writer, and is refused.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = _KINDS.get(stat.S_IFMT(info.st_mode), "a special file")
        raise DataError(f"{path}: not a regular file but {kind}; a {what} must be one")
    if info.st_size > limit:
        os.close(fd)
        raise DataError(f"{path}: {info.st_size:,} bytes, more than a {what} may hold "
                        f"({limit:,})")
    return os.fdopen(fd, "rb")


def read_regular(path: Path, *, limit: int, what: str) -> bytes:
    """The bytes of ``path`` under ``open_regular``'s conditions."""
    with open_regular(path, limit=limit, what=what) as file:
        data = file.read(limit + 1)  # the file may have grown since it was looked at
    if len(data) > limit:
        raise DataError(f"{path}: more than the {limit:,} bytes a {what} may hold")
    return data


def inside(root: Path, path: Path) -> None:
    """Refuses ``path`` when it, or a link on its way, leads out of ``root``: a source is
    what its folder holds, not what links in it point at."""
    target = path.resolve()
    if not target.is_relative_to(root.resolve()):
        raise DataError(f"{path}: links to {target}, outside {root}; copy the file into the "
                        "folder instead")
