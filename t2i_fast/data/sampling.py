"""The loader's sampling plan, in numpy: the specification that the C++ loader
(csrc/sampling.h) reproduces bit for bit.

Every random choice is a pure function of (seed, epoch, stream, record, j), hashed with
SplitMix64's finaliser, so the order and every augmentation are fixed by the seed and the epoch
whatever the thread count, batch size or sharding. docs/format.md states the rules in words.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_U64 = np.uint64
GOLDEN = _U64(0x9E3779B97F4A7C15)

# Streams: one per kind of choice, so that no two choices share random bits.
PERMUTATION, CROP_Y, CROP_X, FLIP, CAPTION, WRONG, WRONG_CROP_Y, WRONG_CROP_X, WRONG_FLIP = (
    range(1, 10)
)


def mix64(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=_U64)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def stream_key(seed: int, epoch: int, stream: int) -> np.ndarray:
    """A 1-element uint64 array (arrays wrap silently on overflow, numpy scalars warn)."""
    h = mix64(np.array([seed], dtype=_U64) + GOLDEN)
    h = mix64(h ^ _U64(epoch))
    return mix64(h ^ _U64(stream))


def draw(key: np.ndarray, index: np.ndarray, j: int = 0) -> np.ndarray:
    """64 random bits for each record index (the j-th draw of that record in this stream)."""
    return mix64(mix64(key ^ np.asarray(index, dtype=_U64)) + _U64(j))


def uniform(bits: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """Map 64 random bits to [0, n) for n < 2**32 by the high-word multiply."""
    return ((bits >> _U64(32)) * np.asarray(n, dtype=_U64)) >> _U64(32)


def epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    """The epoch's permutation of record indices: records sorted by their hash."""
    keys = draw(stream_key(seed, epoch, PERMUTATION), np.arange(count, dtype=_U64))
    return np.argsort(keys, kind="stable").astype(np.int64)


@dataclass(frozen=True)
class Shard:
    """Which records a rank reads in an epoch, batch by batch."""

    records: np.ndarray  # int64 [samples of this rank]
    batch_size: int
    drop_last: bool

    def __len__(self) -> int:
        n = len(self.records)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batch(self, b: int) -> np.ndarray:
        return self.records[b * self.batch_size: (b + 1) * self.batch_size]


def shard(order: np.ndarray, *, rank: int, world_size: int, batch_size: int,
          drop_last: bool) -> Shard:
    """Rank r takes every world_size-th record from r; with drop_last each rank keeps
    count // world_size of them so that all ranks run the same number of batches."""
    records = order[rank::world_size]
    if drop_last:
        records = records[: len(order) // world_size]
    return Shard(records, batch_size, drop_last)


def crops(seed: int, epoch: int, records: np.ndarray, *, stored: tuple[int, int], size: int,
          random_crop: bool, flip: bool, wrong: bool = False) -> tuple[np.ndarray, ...]:
    """(y0, x0, flipped) for each record; ``wrong`` selects the mismatched image's streams."""
    ys, xs, fs = (WRONG_CROP_Y, WRONG_CROP_X, WRONG_FLIP) if wrong else (CROP_Y, CROP_X, FLIP)
    records = np.asarray(records, dtype=_U64)
    if random_crop:
        y0 = uniform(draw(stream_key(seed, epoch, ys), records), stored[0] - size + 1)
        x0 = uniform(draw(stream_key(seed, epoch, xs), records), stored[1] - size + 1)
    else:
        y0 = np.full(len(records), (stored[0] - size) // 2, dtype=_U64)
        x0 = np.full(len(records), (stored[1] - size) // 2, dtype=_U64)
    if flip:
        flipped = draw(stream_key(seed, epoch, fs), records) >> _U64(63)
    else:
        flipped = np.zeros(len(records), dtype=_U64)
    return y0.astype(np.int64), x0.astype(np.int64), flipped.astype(bool)


def caption_choice(seed: int, epoch: int, record: int, *, available: int, k: int) -> np.ndarray:
    """k caption ids of one record: distinct (a partial Fisher-Yates shuffle) while k does not
    exceed the captions available, then drawn with replacement."""
    key = stream_key(seed, epoch, CAPTION)
    ids = np.arange(available, dtype=np.int64)
    out = np.empty(k, dtype=np.int64)
    for j in range(k):
        bits = draw(key, np.array([record], dtype=_U64), j)
        if j < available:
            t = j + int(uniform(bits, available - j)[0])
            ids[j], ids[t] = ids[t], ids[j]
            out[j] = ids[j]
        else:
            out[j] = int(uniform(bits, available)[0])
    return out


class WrongImagePicker:
    """A record of another class for each record (any other record when there is one class),
    uniform over the candidates with a single draw: records are grouped by class, and the
    draw indexes the records outside the group."""

    def __init__(self, class_ids: np.ndarray):
        self.class_ids = np.asarray(class_ids, dtype=np.int64)
        self.count = len(self.class_ids)
        self.by_class = np.argsort(self.class_ids, kind="stable")
        n_classes = int(self.class_ids.max()) + 1
        sizes = np.bincount(self.class_ids, minlength=n_classes)
        self.start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.size = sizes
        self.single_class = np.count_nonzero(sizes) < 2

    def __call__(self, seed: int, epoch: int, records: np.ndarray) -> np.ndarray:
        records = np.asarray(records, dtype=np.int64)
        bits = draw(stream_key(seed, epoch, WRONG), records.astype(_U64))
        if self.single_class:
            t = uniform(bits, self.count - 1).astype(np.int64)
            return np.where(t < records, t, t + 1)
        c = self.class_ids[records]
        start, size = self.start[c], self.size[c]
        t = uniform(bits, self.count - size).astype(np.int64)
        return self.by_class[np.where(t < start, t, t + size)]
