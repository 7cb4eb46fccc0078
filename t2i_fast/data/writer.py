"""Atomic dataset writing: records go to a hidden temporary LMDB beside the target, which is
renamed into place only after the last record and the metadata are on disk. An error or an
interrupt removes the temporary, so no half-written dataset ever carries the final name."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import uuid
from pathlib import Path

import lmdb
import numpy as np

from t2i_fast import __version__
from t2i_fast.data.alphabet import ALPHABET, DEFAULT_DOC_LENGTH, encode_many
from t2i_fast.data.format import (
    ENCODINGS,
    FORMAT_VERSION,
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
        if not 8 <= image_size <= 4096:
            raise DataError(f"image size must be in [8, 4096], got {image_size}")
        self.out = Path(out)
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
        self._tmp = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
        self._env: lmdb.Environment | None = None
        self._pending: list[tuple[bytes, bytes]] = []
        self._count = 0
        self._captions_min = None
        self._captions_max = 0
        self._class_counts = [0] * len(self.classes)

    def __enter__(self) -> DatasetWriter:
        self._tmp.mkdir()
        self._env = lmdb.open(str(self._tmp), map_size=1 << 30, subdir=True, meminit=False,
                              sync=False)
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
        self._pending.append((record_key(self._count), record.pack()))
        self._count += 1
        n = len(captions)
        self._captions_min = n if self._captions_min is None else min(self._captions_min, n)
        self._captions_max = max(self._captions_max, n)
        self._class_counts[class_id] += 1
        if len(self._pending) >= _RECORDS_PER_TXN:
            self._flush()

    def _flush(self) -> None:
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for key, value in self._pending:
                        txn.put(key, value)
                break
            except lmdb.MapFullError:
                self._env.set_mapsize(self._env.info()["map_size"] * 2)
        self._pending.clear()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            if self._env is not None:
                self._env.close()
                self._env = None
            shutil.rmtree(self._tmp, ignore_errors=True)

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
        self._env.sync(True)
        self._env.close()
        self._env = None
        # Readers open without a lock file, so none is shipped.
        (self._tmp / "lock.mdb").unlink(missing_ok=True)
        _fsync_dir(self._tmp)
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, old)
            os.replace(self._tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self._tmp, self.out)
        _fsync_dir(self.out.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
