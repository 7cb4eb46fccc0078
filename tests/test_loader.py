"""The C++ loader against the plain-Python reference, bit for bit, and its guarantees:
determinism, sharding, resumption, mismatched images, corrupt records, lifetimes."""

import gc
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from conftest import write_random_dataset

from t2i_fast import _C
from t2i_fast.data import Dataset, Loader
from t2i_fast.data.alphabet import onehot
from t2i_fast.data.format import record_key
from t2i_fast.data.loader import normalise, pixel_lut
from t2i_fast.data.reference import ReferenceLoader
from t2i_fast.data.sampling import WrongImagePicker
from t2i_fast.data.writer import DatasetWriter
from t2i_fast.errors import CorruptRecordError, DataError

FIELDS = ("images", "wrong_images", "captions", "caption_ids", "class_ids", "wrong_class_ids",
          "indices", "wrong_indices")


def as_reference(batch, layout: str) -> dict:
    """A Loader batch as numpy arrays in the reference's layout."""
    out = {name: getattr(batch, name).numpy() for name in FIELDS}
    if layout == "nhwc":
        for name in ("images", "wrong_images"):
            out[name] = getattr(batch, name).permute(0, 2, 3, 1).numpy()
    return out


def assert_same_epoch(loader: Loader, reference: ReferenceLoader, epoch: int, layout: str):
    got = list(loader)
    expected = list(reference.epoch(epoch))
    assert len(got) == len(expected) == len(loader)
    for g, e in zip(got, expected, strict=True):
        g = as_reference(g, layout)
        for name in FIELDS:
            np.testing.assert_array_equal(g[name], e[name], err_msg=name)


OPTIONS = [
    {},
    {"layout": "nchw"},
    {"caption_format": "indices"},
    {"captions_per_sample": 7},  # more than any record holds: drawn with replacement
    {"captions_per_sample": 1, "flip": False},
    {"random_crop": False},
    {"rank": 1, "world_size": 3, "drop_last": False},
    {"rank": 0, "world_size": 2},
    {"size": 20},  # the whole stored image: only flips vary
    {"size": 13, "layout": "nchw", "caption_format": "indices", "drop_last": False},
    {"caption_format": "ids"},
    {"caption_format": "ids", "captions_per_sample": 7, "rank": 1, "world_size": 2,
     "drop_last": False},
]


@pytest.mark.parametrize("options", OPTIONS,
                         ids=lambda o: ",".join(map(str, o.values())) or "default")
def test_matches_reference_bit_for_bit(random_dataset, options):
    kwargs = {"batch_size": 5, "seed": 3, "size": 16, **options}
    layout = kwargs.get("layout", "nhwc")
    reference = ReferenceLoader(random_dataset, **kwargs)
    with Loader(random_dataset, **kwargs) as loader:
        for epoch in range(2):
            assert loader.epoch == epoch
            assert_same_epoch(loader, reference, epoch, layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_normalised_dtypes_equal_the_reference_through_the_table(random_dataset, dtype):
    reference = next(ReferenceLoader(random_dataset, batch_size=8, seed=1).epoch(0))
    batch = next(iter(Loader(random_dataset, batch_size=8, seed=1, dtype=dtype)))
    assert batch.images.dtype == dtype
    expected = pixel_lut(dtype)[torch.from_numpy(reference["images"]).long()]
    assert torch.equal(batch.images.permute(0, 2, 3, 1), expected)
    assert batch.images.min() >= -1 and batch.images.max() <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onehot_in_float(random_dataset, dtype):
    batch = next(iter(Loader(random_dataset, batch_size=4, caption_format="onehot", dtype=dtype)))
    indices = next(iter(Loader(random_dataset, batch_size=4, caption_format="indices")))
    indices = indices.captions.long()
    assert batch.captions.shape == (4, 4, 70, indices.shape[-1]) and batch.captions.dtype == dtype
    # Each position holds one 1 at channel index-1, or nothing for padding/unknown (index 0).
    assert torch.equal(batch.captions.sum(2), (indices > 0).to(dtype))
    hot = batch.captions.argmax(2) + 1
    assert torch.equal(torch.where(indices > 0, hot, 0), indices)


def test_channels_last_memory(random_dataset):
    batch = next(iter(Loader(random_dataset, batch_size=4, size=16, layout="nhwc")))
    assert batch.images.shape == (4, 3, 16, 16)
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    batch = next(iter(Loader(random_dataset, batch_size=4, size=16, layout="nchw")))
    assert batch.images.is_contiguous()


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_thread_count_changes_nothing(random_dataset, threads):
    one = [as_reference(b, "nhwc") for b in Loader(random_dataset, batch_size=4, num_threads=1)]
    many = Loader(random_dataset, batch_size=4, num_threads=threads, depth=2 * threads)
    for a, b in zip(one, many, strict=True):
        b = as_reference(b, "nhwc")
        for name in FIELDS:
            np.testing.assert_array_equal(a[name], b[name])


def epoch_indices(loader: Loader) -> np.ndarray:
    return np.concatenate([b.indices.numpy() for b in loader])


def test_seed_and_epoch_fix_the_order(random_dataset):
    a = Loader(random_dataset, batch_size=4, seed=7)
    b = Loader(random_dataset, batch_size=4, seed=7)
    first, second = epoch_indices(a), epoch_indices(a)
    assert not np.array_equal(first, second), "reshuffled each epoch"
    np.testing.assert_array_equal(first, epoch_indices(b))
    other = epoch_indices(Loader(random_dataset, batch_size=4, seed=8))
    assert not np.array_equal(first, other)
    assert len(set(first.tolist())) == len(first), "no record twice in an epoch"


def test_shards_are_disjoint_and_cover(random_dataset):
    count = len(Dataset(random_dataset))
    for world in (2, 3, 5):
        shards = [epoch_indices(Loader(random_dataset, batch_size=3, rank=r, world_size=world,
                                       drop_last=False)) for r in range(world)]
        everything = np.concatenate(shards)
        assert len(everything) == count and set(everything.tolist()) == set(range(count))
        dropped = [Loader(random_dataset, batch_size=3, rank=r, world_size=world)
                   for r in range(world)]
        assert len({len(d) for d in dropped}) == 1, "every rank runs the same number of batches"


def test_a_sample_keeps_its_augmentation_across_sharding(random_dataset):
    """Choices hang on (seed, epoch, record), not on the rank or the batch position."""
    whole = {int(i): img for b in Loader(random_dataset, batch_size=4, drop_last=False)
             for i, img in zip(b.indices, b.images, strict=True)}
    for b in Loader(random_dataset, batch_size=3, rank=1, world_size=2, drop_last=False):
        for i, img in zip(b.indices, b.images, strict=True):
            assert torch.equal(whole[int(i)], img)


def test_resume_from_epoch_and_batch(random_dataset):
    full = [as_reference(b, "nhwc") for b in Loader(random_dataset, batch_size=4, epoch=2)]
    loader = Loader(random_dataset, batch_size=4)
    loader.load_state_dict({"epoch": 2, "position": 3})
    resumed = [as_reference(b, "nhwc") for b in loader]
    assert len(resumed) == len(full) - 3
    for a, b in zip(full[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["indices"], b["indices"])
    assert loader.state_dict() == {"epoch": 3, "position": 0}


def test_breaking_out_keeps_the_position(random_dataset):
    loader = Loader(random_dataset, batch_size=4)
    seen = []
    for batch in loader:
        seen.append(batch.indices.clone())
        if len(seen) == 2:
            break
    assert loader.state_dict() == {"epoch": 0, "position": 2}
    seen += [b.indices for b in loader]
    np.testing.assert_array_equal(torch.cat(seen).numpy(),
                                  epoch_indices(Loader(random_dataset, batch_size=4)))


def test_mismatched_images_come_from_another_class(random_dataset):
    ds = Dataset(random_dataset)
    for batch in Loader(random_dataset, batch_size=8):
        assert (batch.class_ids != batch.wrong_class_ids).all()
        for w, c in zip(batch.wrong_indices.tolist(), batch.wrong_class_ids.tolist(), strict=True):
            assert ds[w].class_id == c


def test_single_class_dataset_pairs_with_another_record(tmp_path):
    path = write_random_dataset(tmp_path / "one.lmdb", n=9, classes=1)
    for batch in Loader(path, batch_size=3, epoch=4):
        assert (batch.indices != batch.wrong_indices).all()


def _one_populated_class(path: Path) -> Path:
    """Three classes declared, every record in the second."""
    with DatasetWriter(path, image_size=12, classes=["a", "b", "c"], source="test",
                       split="all") as writer:
        for i in range(11):
            writer.add(np.full((12, 12, 3), i, np.uint8), [f"caption {i}"], class_id=1,
                       name=f"{i}")
    return path


@pytest.mark.parametrize("make", [
    lambda tmp: write_random_dataset(tmp / "one.lmdb", n=13, classes=1),  # as COCO
    lambda tmp: _one_populated_class(tmp / "b.lmdb"),
], ids=["one-class", "one-populated-class"])
def test_without_classes_the_mismatched_image_matches_the_reference(tmp_path, make):
    """Any record but the sample itself, uniformly: the C++ plan and the reference agree bit
    for bit, and over epochs every other record is drawn."""
    path = make(tmp_path)
    reference = ReferenceLoader(path, batch_size=4, seed=5, size=10)
    pairs = set()
    with Loader(path, batch_size=4, seed=5, size=10) as loader:
        for epoch in range(6):
            got = list(loader)
            for g, e in zip(got, reference.epoch(epoch), strict=True):
                g = as_reference(g, "nhwc")
                for name in FIELDS:
                    np.testing.assert_array_equal(g[name], e[name], err_msg=name)
                pairs.update(zip(e["indices"].tolist(), e["wrong_indices"].tolist(),
                                 strict=True))
    count = len(Dataset(path))
    assert all(i != w for i, w in pairs)
    assert {w for _, w in pairs} == set(range(count))
    picker = WrongImagePicker(np.zeros(count, dtype=np.int64))
    wrong = np.stack([picker(0, epoch, np.arange(count)) for epoch in range(2000)])  # [E, N]
    assert (wrong != np.arange(count)).all()
    # Uniform over the count - 1 others: each is drawn about 2000 / (count - 1) times.
    hits = np.bincount(wrong[:, 0], minlength=count)
    assert hits[0] == 0 and hits[1:].min() > 0.6 * 2000 / (count - 1)


def test_captions_are_the_records_captions(random_dataset):
    ds = Dataset(random_dataset)
    for batch in Loader(random_dataset, batch_size=8, captions_per_sample=2,
                        caption_format="indices"):
        for i, ids, chars in zip(batch.indices, batch.caption_ids, batch.captions, strict=True):
            record = ds[int(i)]
            n = len(record.captions)
            if n >= 2:
                assert ids[0] != ids[1], "distinct while the record has enough"
            assert ((ids >= 0) & (ids < n)).all()
            np.testing.assert_array_equal(chars.numpy(), record.char_indices[ids.numpy()])
        assert batch.keys == [record_key(int(i)).decode() for i in batch.indices]


def all_captions(path) -> np.ndarray:
    """Every caption's character indices [captions, L], records in key order: the rows
    global caption ids index."""
    with Dataset(path) as ds:
        return np.concatenate([ds[i].char_indices for i in range(len(ds))])


@pytest.mark.parametrize("options", [{}, {"captions_per_sample": 7, "epoch": 3},
                                     {"rank": 1, "world_size": 2, "drop_last": False}],
                         ids=lambda o: ",".join(map(str, o.values())) or "default")
def test_caption_ids_name_the_captions_the_indices_deliver(random_dataset, options):
    """The same choices as the other formats: each global id is, in the dataset's captions,
    the caption whose characters the "indices" format delivers for that sample."""
    captions = all_captions(random_dataset)
    kwargs = {"batch_size": 5, "seed": 11, **options}
    by_ids = Loader(random_dataset, caption_format="ids", **kwargs)
    assert by_ids.num_captions == len(captions)
    by_chars = Loader(random_dataset, caption_format="indices", **kwargs)
    for ids, chars in zip(by_ids, by_chars, strict=True):
        assert ids.captions.dtype == torch.int64
        assert ids.captions.shape == (len(ids), by_ids.captions_per_sample)
        assert ((ids.captions >= 0) & (ids.captions < len(captions))).all()
        np.testing.assert_array_equal(captions[ids.captions.numpy()], chars.captions.numpy())
        for name in FIELDS:  # images, mismatched images, record ids: unaffected
            if name != "captions":
                assert torch.equal(getattr(ids, name), getattr(chars, name)), name


def test_kept_batches_stay_valid_and_the_ring_grows_only_then(random_dataset):
    loader = Loader(random_dataset, batch_size=4, depth=3)
    kept = list(loader)  # more batches than slots, all alive at once
    assert loader.num_slots >= len(kept)
    reference = list(ReferenceLoader(random_dataset, batch_size=4).epoch(0))
    for k, r in zip(kept, reference, strict=True):
        np.testing.assert_array_equal(k.images.permute(0, 2, 3, 1).numpy(), r["images"])
    loader = Loader(random_dataset, batch_size=4, depth=3)
    for _ in range(3):
        for _batch in loader:
            pass
    assert loader.num_slots == 3


def test_batches_outlive_a_closed_loader(random_dataset):
    loader = Loader(random_dataset, batch_size=4)
    batch = next(iter(loader))
    before = batch.images.clone()
    loader.close()
    del loader
    gc.collect()
    assert torch.equal(batch.images, before)


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def test_a_core_dropped_unclosed_stops_its_threads_while_a_batch_lives(random_dataset):
    """The core handle goes without close() while a batch still leases a slot (and so keeps
    the C++ loader alive): its threads must stop with the handle, not go on filling slots
    whose buffers went with it."""
    base = _thread_count()
    loader = Loader(random_dataset, batch_size=4, num_threads=3)
    batch = next(iter(loader))
    before = batch.images.clone()
    core, loader._core = loader._core, None  # the Python side will not close it
    assert _thread_count() == base + 3
    del core, loader
    gc.collect()
    assert _thread_count() == base
    assert torch.equal(batch.images, before)


_CLOSE_FROM_THREADS = """
import gc, os, sys, threading, time
import numpy as np
from t2i_fast.data.loader import Loader

class SlowToFree(np.ndarray):
    def __del__(self):
        time.sleep(0.02)  # the GIL goes to another thread while the handle drops its slots

def thread_count():
    return len(os.listdir("/proc/self/task"))

base = thread_count()
for _ in range(5):
    loader = Loader(sys.argv[1], batch_size=4, num_threads=4)
    batch = next(iter(loader))
    core, loader._core = loader._core, None
    for _ in range(4):
        core.add_slot(np.zeros(core.layout["bytes"], np.uint8).view(SlowToFree))
    start = threading.Barrier(3)

    def close(core=core, start=start):
        start.wait()
        core.close()

    closers = [threading.Thread(target=close) for _ in range(3)]
    for t in closers:
        t.start()
    for t in closers:
        t.join()
    del core, loader, batch
gc.collect()
print("threads left", thread_count() - base)
"""


def test_closing_from_threads_at_once_joins_once_and_frees_once(random_dataset, tmp_path):
    """Concurrent close() calls of one core all return after its threads are joined, and
    drop each slot buffer once: dropping one may run Python code that lets another closing
    thread in, which must find the handle's buffers gone (released twice, they crashed a
    later test). In a child process, so that a crash fails this test alone; run outside the
    checkout, whose source tree would shadow the installed package."""
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _CLOSE_FROM_THREADS,
                           str(random_dataset)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "threads left 0"


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_record(path: Path, index: int, change) -> None:
    env = lmdb.open(str(path), lock=False)
    with env.begin(write=True) as txn:
        key = record_key(index)
        txn.put(key, change(bytes(txn.get(key))))
    env.close()


def test_corrupt_pixels_raise_naming_the_key(random_dataset, tmp_path):
    path = copy_dataset(random_dataset, tmp_path / "bad.lmdb")

    def flip_a_pixel_byte(data: bytes) -> bytes:
        captions, doc_length = struct.unpack_from("<HH", data, 16)
        at = 64 + captions * doc_length + 100  # header, character indices, then pixels
        return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]

    rewrite_record(path, 11, flip_a_pixel_byte)
    with pytest.raises(CorruptRecordError, match=r"bad\.lmdb: record '00000011': checksum"):
        for _ in Loader(path, batch_size=4, drop_last=False):
            pass
    with pytest.raises(CorruptRecordError, match="00000011"):
        Dataset(path)[11]
    # Without verification the loader trusts the bytes: the check is what catches it.
    assert sum(len(b) for b in Loader(path, batch_size=4, drop_last=False, verify=False)) == 37
    # The process is fine and a good dataset still loads.
    assert len(list(Loader(random_dataset, batch_size=4))) == len(Loader(random_dataset,
                                                                          batch_size=4))


@pytest.mark.parametrize("change, message", [
    (lambda d: d[:-10], "truncated or malformed"),
    (lambda d: d[:30], "truncated record"),
    (lambda d: b"XXXX" + d[4:], "bad magic"),
])
def test_malformed_records_raise_naming_the_key(random_dataset, tmp_path, change, message):
    path = copy_dataset(random_dataset, tmp_path / "bad.lmdb")
    rewrite_record(path, 5, change)
    with pytest.raises(CorruptRecordError, match=f"record '00000005'.*{message}"):
        Loader(path, batch_size=4)


def test_missing_record(random_dataset, tmp_path):
    path = copy_dataset(random_dataset, tmp_path / "bad.lmdb")
    env = lmdb.open(str(path), lock=False)
    with env.begin(write=True) as txn:  # as many entries as before, one key misspelt
        txn.put(b"0000036x", txn.pop(record_key(36)))
    env.close()
    with pytest.raises(CorruptRecordError, match="record '00000036': missing"):
        Loader(path, batch_size=4)
    with Dataset(path) as ds, pytest.raises(CorruptRecordError, match="'00000036' is missing"):
        ds[36]
    with lmdb.open(str(path), lock=False) as env, env.begin(write=True) as txn:
        txn.delete(b"0000036x")
    with pytest.raises(CorruptRecordError, match="says 37 records, the LMDB holds 36 besides it"):
        Loader(path, batch_size=4)


def test_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="not a t2i-fast dataset"):
        Loader(tmp_path, batch_size=4)
    with pytest.raises(DataError, match="not a t2i-fast dataset"):
        Loader(tmp_path / "missing.lmdb", batch_size=4)


@pytest.mark.parametrize("kwargs, message", [
    ({"size": 21}, "size must be in"),
    ({"rank": 2, "world_size": 2}, "rank must be in"),
    ({"batch_size": 40}, "batch_size 40 leaves no full batch"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"captions_per_sample": 0}, "captions_per_sample"),
    ({"layout": "hwc"}, "layout must be one of"),
    ({"dtype": torch.int32}, "dtype must be one of"),
    ({"caption_format": "text"}, "caption_format must be one of"),
])
def test_bad_arguments_name_the_argument(random_dataset, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Loader(random_dataset, **{"batch_size": 4, **kwargs})


_ELEM_BYTES = {torch.uint8: 1, torch.bfloat16: 2, torch.float32: 4}


@pytest.mark.parametrize("options", [
    {},
    {"layout": "nchw", "dtype": torch.float32, "captions_per_sample": 3},
    {"caption_format": "indices", "dtype": torch.bfloat16, "size": 13},
    {"caption_format": "ids", "dtype": torch.float32, "captions_per_sample": 3},
])
def test_batch_views_follow_the_layout_the_core_exports(random_dataset, options):
    loader = Loader(random_dataset, batch_size=4, **options)
    exported = _C.slot_layout(
        batch_size=4, size=loader.size, captions_per_sample=loader.captions_per_sample,
        doc_length=loader.meta["doc_length"], caption_format=loader.caption_format,
        elem_bytes=_ELEM_BYTES[loader.dtype], nhwc=loader.layout == "nhwc")
    assert loader._core.layout == exported
    batch = next(iter(loader))
    base = batch.images.data_ptr()  # the slot's first byte: images lie at offset 0
    storage = {name: getattr(batch, name) for name in FIELDS}
    if loader.layout == "nhwc":
        for name in ("images", "wrong_images"):
            storage[name] = storage[name].permute(0, 2, 3, 1)
    dtypes = {"pixel": loader.dtype, "uint8": torch.uint8, "int64": torch.int64}
    seen = set()
    for name, offset, dtype, shape in exported["fields"]:
        if name == "onehot_shadow":
            continue
        tensor = storage[name]
        assert tensor.data_ptr() - base == offset, name
        assert tuple(tensor.shape) == shape and tensor.is_contiguous(), name
        assert tensor.dtype == dtypes[dtype], name
        seen.add(name)
    assert seen == set(FIELDS)
    loader.close()


def test_exported_slot_layout_is_aligned_and_disjoint():
    layout = _C.slot_layout(batch_size=3, size=5, captions_per_sample=2, doc_length=7,
                            caption_format="onehot", elem_bytes=4, nhwc=False)
    size = {"pixel": 4, "uint8": 1, "int64": 8}
    end = 0
    for name, offset, dtype, shape in layout["fields"]:
        assert offset % 64 == 0 and offset >= end, name
        end = offset + math.prod(shape) * size[dtype]
    assert layout["bytes"] >= end and layout["bytes"] % 64 == 0
    names = [field[0] for field in layout["fields"]]
    assert names == [*FIELDS, "onehot_shadow"]
    shapes = {field[0]: field[3] for field in layout["fields"]}
    assert shapes["images"] == (3, 3, 5, 5) and shapes["captions"] == (3, 2, 70, 7)
    assert shapes["onehot_shadow"] == (3, 2, 7)
    ids = _C.slot_layout(batch_size=3, size=5, captions_per_sample=2, doc_length=7,
                         caption_format="ids", elem_bytes=4, nhwc=False)
    fields = {field[0]: field for field in ids["fields"]}
    assert fields["captions"][2:] == ("int64", (3, 2))
    assert fields["onehot_shadow"][3] == (3, 2, 0)


@pytest.mark.parametrize("name, value, message", [
    ("batch_size", 0, "batch_size must be at least 1"),
    ("batch_size", 1 << 25, "batch_size must be at most"),
    ("size", 0, "size must be in"),
    ("captions_per_sample", 256, "captions_per_sample must be in"),
    ("doc_length", 0, "doc_length must be in"),
    ("elem_bytes", 3, "elem_bytes must be 1, 2 or 4"),
    ("caption_format", "text", "caption_format must be 'indices', 'onehot' or 'ids'"),
])
def test_slot_layout_names_a_bad_argument(name, value, message):
    geometry = {"batch_size": 2, "size": 4, "captions_per_sample": 1, "doc_length": 3,
                "caption_format": "onehot", "elem_bytes": 1, "nhwc": True, name: value}
    with pytest.raises(ValueError, match=message):
        _C.slot_layout(**geometry)


def test_two_loaders_at_once_and_reopening(random_dataset):
    a = Loader(random_dataset, batch_size=4, seed=1)
    b = Loader(random_dataset, batch_size=4, seed=1)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.images, y.images)
    a.close()
    a = Loader(random_dataset, batch_size=4, seed=1, epoch=1)
    assert b.epoch == 1
    np.testing.assert_array_equal(epoch_indices(a), epoch_indices(b))
    with Dataset(random_dataset) as ds:  # a Dataset open beside loaders
        assert ds[0].key == "00000000"
        assert len(list(Loader(random_dataset, batch_size=4))) == len(a)


def test_no_threads_or_memory_leak(random_dataset):
    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    for _ in range(3):  # warm up allocator pools
        with Loader(random_dataset, batch_size=4, num_threads=4) as loader:
            list(loader)
    gc.collect()
    base_threads, base_rss = _thread_count(), rss_mib()
    for _ in range(30):
        # 12 slots of 64 x 2 x 3 x 20 x 20 bytes: 3.6 MiB a loader, 110 MiB if leaked
        loader = Loader(random_dataset, batch_size=4, num_threads=4, depth=12,
                        size=20)
        assert _thread_count() == base_threads + 4
        for _batch in loader:
            pass
        loader.close()
        del loader, _batch
    gc.collect()
    assert _thread_count() == base_threads
    assert rss_mib() - base_rss < 20


def test_jpeg_records_decode_like_pillow(tmp_path):
    path = write_random_dataset(tmp_path / "jpeg.lmdb", n=12, size=32, encoding="jpeg")
    reference = list(ReferenceLoader(path, batch_size=4, size=24).epoch(0))
    got = list(Loader(path, batch_size=4, size=24))
    for g, r in zip(got, reference, strict=True):
        diff = np.abs(g.images.permute(0, 2, 3, 1).numpy().astype(int) - r["images"])
        assert diff.max() <= 2  # the same libjpeg-turbo IDCT; versions may round apart
        np.testing.assert_array_equal(g.indices.numpy(), r["indices"])


def test_corrupt_jpeg_raises(tmp_path):
    path = write_random_dataset(tmp_path / "jpeg.lmdb", n=6, size=32, encoding="jpeg")
    with Dataset(path) as ds:
        record = ds.record(2)
    # A JPEG whose entropy-coded data is cut, with a valid CRC: the decoder must refuse it.
    record.pixels = record.pixels[: len(record.pixels) // 2]
    rewrite_record(path, 2, lambda _: record.pack())
    with pytest.raises(CorruptRecordError, match="record '00000002': JPEG does not decode"):
        for _ in Loader(path, batch_size=6, random_crop=False):
            pass


def test_restarting_mid_epoch_never_hangs_or_mixes_epochs(tmp_path):
    """Epoch switches race with workers still filling the last epoch's batches: each restart
    must wait for them, drop them, and give exactly the new epoch's batches. (JPEG records
    make fills slow enough for switches to land while workers are busy.)"""
    import threading

    path = write_random_dataset(tmp_path / "slow.lmdb", n=40, size=96, encoding="jpeg")
    expected = {e: [b["indices"] for b in ReferenceLoader(path, batch_size=2).epoch(e)]
                for e in range(3)}
    loader = Loader(path, batch_size=2, num_threads=6, depth=8)
    failures = []

    def restart_many_times():
        try:
            for trial in range(150):
                epoch, start = trial % 3, trial % 5
                loader.set_epoch(epoch, start)
                for i, batch in enumerate(loader):
                    np.testing.assert_array_equal(batch.indices.numpy(), expected[epoch][start + i])
                    if i == trial % 4:
                        break
        except Exception as exc:  # reported to the test's thread
            failures.append(exc)

    worker = threading.Thread(target=restart_many_times, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the loader hung on an epoch switch"
    assert not failures, failures


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_side_conversions_equal_the_loaders(random_dataset, layout, dtype):
    """On a GPU the loader moves uint8 pixels and indices and converts there with these
    functions; they must give what the C++ loader gives on the host, layout included."""
    options = dict(batch_size=6, seed=2, layout=layout)
    host = next(iter(Loader(random_dataset, dtype=dtype, **options)))
    compact = next(iter(Loader(random_dataset, caption_format="indices", **options)))
    images = normalise(compact.images, pixel_lut(dtype), layout)
    assert torch.equal(images, host.images)
    assert images.stride() == host.images.stride()
    captions = onehot(compact.captions, dtype)
    assert torch.equal(captions, host.captions) and captions.is_contiguous()


def test_lmdb_failures_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.lmdb"
    garbage.mkdir()
    (garbage / "data.mdb").write_bytes(b"not an lmdb file" * 512)
    with pytest.raises(DataError, match=r"garbage\.lmdb: cannot open as LMDB"):
        Loader(garbage, batch_size=4)
    # The native core maps LMDB status codes to the same exception, naming file and call.
    with pytest.raises(DataError, match=r"garbage\.lmdb: mdb_env_open: .*"):
        _C.Loader(str(garbage), count=10, num_classes=2, image_height=8, image_width=8,
                  doc_length=8, encoding="raw", batch_size=4, size=4, captions_per_sample=1,
                  caption_format="indices",
                  elem_bytes=1, lut=bytes(range(256)), one=b"\x01", nhwc=True,
                  random_crop=True, flip=True, seed=0, rank=0, world_size=1, drop_last=True,
                  num_threads=1, verify=True)


def test_device_batches_on_another_device(random_dataset):
    """The device path's plumbing, on PyTorch's meta device (shapes and dtypes, no data)."""
    loader = Loader(random_dataset, batch_size=4, size=16, dtype=torch.bfloat16, device="meta")
    batches = list(loader)
    assert len(batches) == len(loader) and loader.state_dict() == {"epoch": 1, "position": 0}
    batch = batches[0]
    assert batch.images.device.type == "meta" and batch.images.dtype == torch.bfloat16
    assert batch.images.shape == (4, 3, 16, 16)
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert batch.captions.shape == (4, 4, 70, 201) and batch.captions.dtype == torch.bfloat16
    assert batch.class_ids.device.type == "meta"
    ids = next(iter(Loader(random_dataset, batch_size=4, caption_format="ids", device="meta")))
    assert ids.captions.shape == (4, 4) and ids.captions.dtype == torch.int64


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA: pinned slots and the side-stream copy exist on GPUs only")
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16])
def test_cuda_batches_equal_host_batches(random_dataset, dtype):
    host = list(Loader(random_dataset, batch_size=4, dtype=dtype))
    loader = Loader(random_dataset, batch_size=4, dtype=dtype, device="cuda")
    assert loader._buffers[0].is_pinned()
    for h, d in zip(host, loader, strict=True):
        assert d.images.is_cuda and d.images.is_contiguous(memory_format=torch.channels_last)
        for name in FIELDS:
            assert torch.equal(getattr(d, name).cpu(), getattr(h, name)), name
