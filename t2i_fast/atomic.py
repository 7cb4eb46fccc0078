"""Files that are either whole or absent: written to a temporary beside the target, flushed
to the disk (fsync), renamed over the target, and the folder's entry flushed too, so that a
kill, a crash or a power cut leaves the old file or the new one, never part of one. A write
that fails removes its temporary and, when the disk is full, says so in one line."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from t2i_fast.errors import T2IError

TMP_SUFFIX = ".tmp"


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """``write(file)`` into ``path.tmp``, then that renamed to ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(exc, path)
        raise
    return path


def save_atomically(obj, path: Path) -> Path:
    """``torch.save(obj)`` into ``path``, whole or not at all."""
    return write_atomically(path, lambda file: torch.save(obj, file))


def write_text_atomically(path: Path, text: str) -> Path:
    return write_atomically(path, lambda file: file.write(text.encode()))


def fsync_dir(path: Path) -> None:
    """Makes the folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def raise_if_disk_full(exc: BaseException, path: Path) -> None:
    """A T2IError naming ``path`` when ``exc`` comes of a full disk (or quota). torch.save
    reports a failed write as a RuntimeError whose context holds the OSError."""
    if isinstance(exc, T2IError):
        return  # already says what it is
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise T2IError(f"{path}: {os.strerror(exc.errno).lower()}") from exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
