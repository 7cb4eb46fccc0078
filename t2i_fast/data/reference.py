"""The loader's sampling in plain Python (py-lmdb and numpy): slow, obviously correct, and
compared bit for bit with the C++ loader in the tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from t2i_fast.data import sampling
from t2i_fast.data.alphabet import ALPHABET_SIZE
from t2i_fast.data.dataset import Dataset
from t2i_fast.data.loader import default_size


class ReferenceLoader:
    """Same options as ``Loader`` (uint8 output); batches are dicts of numpy arrays."""

    def __init__(self, path: str | Path, *, batch_size: int, seed: int = 0,
                 size: int | None = None, captions_per_sample: int = 4,
                 caption_format: str = "onehot", layout: str = "nhwc",
                 random_crop: bool = True, flip: bool = True, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True):
        with Dataset(path) as dataset:
            self.records = [dataset.record(i) for i in range(len(dataset))]
            self.stored = tuple(dataset.meta["image_size"])
            self.path = dataset.path
        self.size = default_size(min(self.stored)) if size is None else size
        self.batch_size = batch_size
        self.seed = seed
        self.k = captions_per_sample
        self.caption_format = caption_format
        self.nhwc = layout == "nhwc"
        self.random_crop, self.flip = random_crop, flip
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.class_ids = np.array([r.class_id for r in self.records])
        self.pick_wrong = sampling.WrongImagePicker(self.class_ids)
        # Each record's first global caption id: captions numbered in record order.
        counts = [len(r.char_indices) for r in self.records]
        self.first_caption = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def _crop(self, index: int, y0: int, x0: int, flipped: bool) -> np.ndarray:
        image = self.records[index].image(where=f"{self.path}: record '{index:08d}'")
        image = image[y0: y0 + self.size, x0: x0 + self.size]
        if flipped:
            image = image[:, ::-1]
        return image if self.nhwc else image.transpose(2, 0, 1)

    def epoch(self, epoch: int, first_batch: int = 0) -> Iterator[dict]:
        order = sampling.epoch_order(self.seed, epoch, len(self.records))
        shard = sampling.shard(order, rank=self.rank, world_size=self.world_size,
                               batch_size=self.batch_size, drop_last=self.drop_last)
        crop = dict(stored=self.stored, size=self.size, random_crop=self.random_crop,
                    flip=self.flip)
        for b in range(first_batch, len(shard)):
            records = shard.batch(b)
            wrong = self.pick_wrong(self.seed, epoch, records)
            ys, xs, fs = sampling.crops(self.seed, epoch, records, **crop)
            wys, wxs, wfs = sampling.crops(self.seed, epoch, records, wrong=True, **crop)
            ids = np.stack([
                sampling.caption_choice(self.seed, epoch, int(r),
                                        available=len(self.records[r].captions), k=self.k)
                for r in records
            ])
            if self.caption_format == "ids":
                captions = self.first_caption[records][:, None] + ids  # [B, k]
            else:
                captions = np.stack([self.records[r].char_indices[i]
                                     for r, i in zip(records, ids, strict=True)])
            if self.caption_format == "onehot":
                eye = np.eye(ALPHABET_SIZE + 1, dtype=np.uint8)[:, 1:]  # index 0 → zeros
                captions = eye[captions].transpose(0, 1, 3, 2)  # [B, k, 70, L]
            yield {
                "images": np.stack([self._crop(r, y, x, f)
                                    for r, y, x, f in zip(records, ys, xs, fs, strict=True)]),
                "wrong_images": np.stack([
                    self._crop(w, y, x, f) for w, y, x, f in zip(wrong, wys, wxs, wfs, strict=True)
                ]),
                "captions": captions,
                "caption_ids": ids,
                "class_ids": self.class_ids[records],
                "wrong_class_ids": self.class_ids[wrong],
                "indices": records,
                "wrong_indices": wrong,
            }
