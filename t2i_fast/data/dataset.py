"""Random access to a prepared dataset, one record at a time (for inspection, evaluation and
sample captions; training reads through the C++ ``Loader``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from t2i_fast.data.format import (
    Record,
    RecordSpec,
    close_env,
    open_env,
    read_metadata,
    record_key,
)
from t2i_fast.errors import CorruptRecordError


@dataclass
class Sample:
    image: np.ndarray  # uint8 [H, W, 3]
    captions: list[str]
    char_indices: np.ndarray  # uint8 [captions, doc length]
    class_id: int
    key: str  # the LMDB key
    name: str  # where the image came from
    attributes: dict  # ground truth where the source has it (the shapes dataset)


class Dataset:
    """``len(ds)`` records; ``ds[i]`` is a ``Sample``. Opening checks the metadata against
    record 0; each record is checked as the C++ loader checks it when it is read, and a bad
    one raises CorruptRecordError naming the file and key."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._env = open_env(self.path)
        try:
            self.meta = read_metadata(self._env, self.path)
            self._spec = RecordSpec.of(self.meta)
        except BaseException:
            close_env(self._env)
            raise

    def __len__(self) -> int:
        return self.meta["count"]

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    def record(self, index: int) -> Record:
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} outside a dataset of {len(self)}")
        index %= len(self)
        key = record_key(index)
        with self._env.begin(buffers=True) as txn:
            data = txn.get(key)
            if data is None:
                raise CorruptRecordError(f"{self._where(index)} is missing")
            return Record.unpack(data, where=self._where(index), spec=self._spec)

    def _where(self, index: int) -> str:
        return f"{self.path}: record '{record_key(index).decode()}'"

    def __getitem__(self, index: int) -> Sample:
        rec = self.record(index)
        return Sample(
            image=rec.image(where=self._where(index % len(self))), captions=rec.captions,
            char_indices=rec.char_indices,
            class_id=rec.class_id, key=record_key(index % len(self)).decode(), name=rec.name,
            attributes=rec.attributes,
        )

    def close(self) -> None:
        if self._env is not None:
            close_env(self._env)
            self._env = None

    def __enter__(self) -> Dataset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
