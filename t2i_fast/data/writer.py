"""Atomic dataset writing: records go to a hidden temporary LMDB beside the target, which is
renamed into place only after the last record and the metadata are on disk. An error or an
interrupt removes the temporary, so no half-written dataset ever carries the final name.

Replacing a dataset (``overwrite``) swaps the two in one step (Linux's renameat2
RENAME_EXCHANGE), so the name always holds one whole dataset, the old or the new. Where the
file system cannot swap, the old one is first renamed to a hidden backup; a writer started
after a kill between the two renames puts the backup back. A writer also deletes the
temporaries that killed writers left behind (a live writer holds a lock on its own)."""

from __future__ import annotations

import ctypes
import datetime
import errno
import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path

import lmdb
import numpy as np

from t2i_fast import __version__
from t2i_fast.atomic import fsync_dir
from t2i_fast.data.alphabet import ALPHABET, DEFAULT_DOC_LENGTH, encode_many
from t2i_fast.data.format import (
    ENCODINGS,
    FORMAT_VERSION,
    MAX_IMAGE_SIZE,
    META_KEY,
    Record,
    encode_pixels,
    record_key,
)
from t2i_fast.errors import DataError

_RECORDS_PER_TXN = 512


class DatasetWriter:
    """Use as a context manager; ``add`` one image at a time.

    ``image_size`` is the stored (load) size: every image must be uint8 [size, size, 3].
    """

    def __init__(self, out: str | Path, *, image_size: int, classes: list[str], source: str,
                 split: str, encoding: str = "raw", doc_length: int = DEFAULT_DOC_LENGTH,
                 jpeg_quality: int = 95, overwrite: bool = False, extra_meta: dict | None = None):
        if encoding not in ENCODINGS:
            raise DataError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        if not 8 <= image_size <= MAX_IMAGE_SIZE:
            raise DataError(f"image size must be in [8, {MAX_IMAGE_SIZE}], got {image_size}")
        self.out = Path(out)
        _recover(self.out)
        if self.out.exists() and not overwrite:
            raise DataError(f"{self.out}: already exists (pass --overwrite to replace it)")
        if not self.out.parent.is_dir():
            raise DataError(f"{self.out.parent}: output folder does not exist")
        self.image_size = image_size
        self.classes = list(classes)
        self.encoding = encoding
        self.doc_length = doc_length
        self.jpeg_quality = jpeg_quality
        self.overwrite = overwrite
        self.meta = {
            "format_version": FORMAT_VERSION,
            "image_size": [image_size, image_size],
            "encoding": encoding,
            "pixel_format": "uint8 RGB, HWC",
            "alphabet": ALPHABET,
            "doc_length": doc_length,
            "classes": self.classes,
            "source": source,
            "split": split,
            "created_by": f"t2i-fast {__version__}",
            **(extra_meta or {}),
        }
        self._tmp = self.out.parent / f"{_temporary_prefix(self.out)}{uuid.uuid4().hex[:8]}"
        self._lock: int | None = None  # a descriptor of the temporary, locked while writing
        self._env: lmdb.Environment | None = None
        self._pending: list[tuple[bytes, bytes]] = []
        self._pending_bytes = 0
        self._count = 0
        self._captions_min = None
        self._captions_max = 0
        self._class_counts = [0] * len(self.classes)

    def __enter__(self) -> DatasetWriter:
        try:
            self._tmp.mkdir()
            self._lock = os.open(self._tmp, os.O_RDONLY)
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._env = lmdb.open(str(self._tmp), map_size=1 << 30, subdir=True,
                                  meminit=False, sync=False)
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            self._raise_write_error(exc)
            raise
        return self

    def add(self, image: np.ndarray, captions: list[str], *, class_id: int, name: str,
            attributes: dict | None = None) -> None:
        if image.dtype != np.uint8 or image.shape != (self.image_size, self.image_size, 3):
            raise DataError(f"{name}: image must be uint8 [{self.image_size}, "
                            f"{self.image_size}, 3], got {image.dtype} {list(image.shape)}")
        if not captions or any(not c.strip() for c in captions):
            raise DataError(f"{name}: needs at least one non-empty caption")
        if "\n" in "".join(captions):
            raise DataError(f"{name}: a caption holds a line break")
        if not 0 <= class_id < len(self.classes):
            raise DataError(f"{name}: class id {class_id} outside [0, {len(self.classes)})")
        record = Record(
            class_id=class_id, name=name, captions=captions,
            char_indices=encode_many(captions, self.doc_length),
            pixels=encode_pixels(image, self.encoding, jpeg_quality=self.jpeg_quality),
            height=self.image_size, width=self.image_size, encoding=self.encoding,
            attributes=attributes or {},
        )
        packed = record.pack()
        self._pending.append((record_key(self._count), packed))
        self._pending_bytes += len(packed)
        self._count += 1
        n = len(captions)
        self._captions_min = n if self._captions_min is None else min(self._captions_min, n)
        self._captions_max = max(self._captions_max, n)
        self._class_counts[class_id] += 1
        if len(self._pending) >= _RECORDS_PER_TXN:
            self._flush()

    def _flush(self) -> None:
        try:
            while True:
                try:
                    with self._env.begin(write=True) as txn:
                        for key, value in self._pending:
                            txn.put(key, value)
                    break
                except lmdb.MapFullError:
                    self._env.set_mapsize(self._env.info()["map_size"] * 2)
        except (lmdb.Error, OSError) as exc:
            self._raise_write_error(exc)
            raise
        self._pending.clear()
        self._pending_bytes = 0

    def _raise_write_error(self, exc: BaseException) -> None:
        """A DataError naming the dataset for a failed write: "no space left" when the disk
        is full. LMDB reports a write the disk had no room for as EIO (a short write), so
        the free space decides."""
        if not isinstance(exc, lmdb.Error | OSError):
            return
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        try:
            full = full or shutil.disk_usage(self.out.parent).free < self._pending_bytes + (1 << 20)
        except OSError:
            pass
        if full:
            raise DataError(f"{self.out}: no space left on device "
                            f"(writing {self._tmp.name} beside it)") from exc
        raise DataError(f"{self.out}: cannot write the dataset ({exc})") from exc

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            if self._env is not None:
                self._env.close()
                self._env = None
            # After a swap the temporary's name holds the replaced dataset.
            shutil.rmtree(self._tmp, ignore_errors=True)
            if self._lock is not None:
                os.close(self._lock)
                self._lock = None

    def _finish(self) -> None:
        if self._count == 0:
            raise DataError(f"{self.out}: no images to write")
        self.meta.update(
            count=self._count,
            captions_per_image=self._captions_min,
            captions_per_image_max=self._captions_max,
            class_counts=self._class_counts,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        self._pending.append((META_KEY, json.dumps(self.meta, indent=1).encode()))
        self._flush()
        try:
            self._env.sync(True)
            self._env.close()
            self._env = None
            # Readers open without a lock file, so none is shipped.
            (self._tmp / "lock.mdb").unlink(missing_ok=True)
            fsync_dir(self._tmp)
            if not (self.out.exists() and _exchange(self._tmp, self.out)):
                _replace(self._tmp, self.out)
            fsync_dir(self.out.parent)
        except (lmdb.Error, OSError) as exc:
            self._raise_write_error(exc)
            raise


def _temporary_prefix(out: Path) -> str:
    return f".{out.name}.tmp-"


def _backup(out: Path) -> Path:
    return out.parent / f".{out.name}.old"


def _replace(new: Path, out: Path) -> None:
    """``new`` renamed to ``out``; an ``out`` already there goes by way of the backup name,
    which ``_recover`` puts back if a kill comes between the renames."""
    if out.exists():
        backup = _backup(out)
        os.replace(out, backup)
        try:
            os.replace(new, out)
        except BaseException:
            os.replace(backup, out)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(new, out)


def _recover(out: Path) -> None:
    """Undoes what a writer killed while writing ``out`` left: the backup of a dataset being
    replaced goes back under its name if none holds it (else is deleted), and temporaries
    no live writer holds are deleted."""
    backup = _backup(out)
    if backup.exists():
        if out.exists():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(backup, out)
    if not out.parent.is_dir():
        return
    for tmp in out.parent.glob(f"{_temporary_prefix(out)}*"):
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live writer's
        finally:
            os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps ``a`` and ``b`` in one step; False where the system or the file system cannot
    (not Linux, an old kernel, a file system without RENAME_EXCHANGE)."""
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))
