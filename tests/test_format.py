"""The record format, the alphabet encoding and the atomic writer."""

import json

import numpy as np
import pytest
from conftest import write_random_dataset

from t2i_fast.data import Dataset
from t2i_fast.data.alphabet import ALPHABET, ALPHABET_SIZE, decode, encode, normalize
from t2i_fast.data.format import Record, encode_pixels
from t2i_fast.data.writer import DatasetWriter
from t2i_fast.errors import CorruptRecordError, DataError


def test_alphabet_is_reeds():
    assert ALPHABET_SIZE == 70 and ALPHABET.endswith(" ")
    # Lua's dictionary keeps the later '-': index 60; index 37 never occurs.
    assert encode("-", 1)[0] == 60
    assert 37 not in encode(ALPHABET, 80)
    assert encode("a", 1)[0] == 1 and encode(" ", 1)[0] == 70


def test_encoding_rules():
    out = encode("The Bird", 12)
    assert out.dtype == np.uint8 and out.shape == (12,)
    assert decode(out) == "the bird"
    assert (out[8:] == 0).all(), "zero-padded"
    assert len(encode("x" * 300)) == 201 and (encode("x" * 300) == 24).all(), "truncated"
    # U+FFFD stands for a lost space in Reed's captions; accents fold; other symbols are 0.
    assert decode(encode("a\ufffdbird")) == "a bird"
    assert decode(encode("café")) == "cafe"
    snowman = encode("a☃b", 3)
    assert snowman.tolist() == [1, 0, 2]
    assert decode(snowman) == "a\ufffdb"
    assert normalize("A\tB\u00a0C") == "a b c"


def test_record_round_trip_and_checks():
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    rec = Record(class_id=3, name="x/y", captions=["a bird", "b"],
                 char_indices=np.stack([encode("a bird", 8), encode("b", 8)]),
                 pixels=encode_pixels(image, "raw"), height=4, width=4,
                 attributes={"color": "red"})
    data = rec.pack()
    back = Record.unpack(data, where="k")
    assert back.captions == rec.captions and back.class_id == 3 and back.name == "x/y"
    assert back.attributes == {"color": "red"}
    np.testing.assert_array_equal(back.image(where="k"), image)
    np.testing.assert_array_equal(back.char_indices, rec.char_indices)
    with pytest.raises(CorruptRecordError, match="k: checksum mismatch"):
        Record.unpack(data[:-1] + bytes([data[-1] ^ 1]), where="k")
    with pytest.raises(CorruptRecordError, match="k: truncated or malformed"):
        Record.unpack(data[:-3], where="k")


def test_dataset_reads_what_was_written(tmp_path):
    path = write_random_dataset(tmp_path / "d.lmdb", n=5, size=12, classes=2)
    with Dataset(path) as ds:
        assert len(ds) == 5 and ds.classes == ["class0", "class1"]
        sample = ds[4]
        assert sample.key == "00000004" and sample.name == "img 4"
        assert sample.image.shape == (12, 12, 3) and sample.image.dtype == np.uint8
        assert sample.char_indices.shape == (len(sample.captions), 201)
        assert decode(sample.char_indices[0]) == normalize(sample.captions[0])[:201]
        assert ds[-1].key == "00000004"
        with pytest.raises(IndexError):
            ds[5]
        meta = ds.meta
    assert meta["count"] == 5 and meta["format_version"] == 1 and meta["encoding"] == "raw"
    assert meta["image_size"] == [12, 12] and meta["doc_length"] == 201
    assert sum(meta["class_counts"]) == 5 and meta["captions_per_image"] >= 1


def test_writer_is_atomic(tmp_path):
    out = tmp_path / "d.lmdb"
    with pytest.raises(RuntimeError, match="interrupted"):
        with DatasetWriter(out, image_size=8, classes=["a"], source="t", split="all") as w:
            w.add(np.zeros((8, 8, 3), np.uint8), ["a caption"], class_id=0, name="one")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == [], "nothing half-written, no temporary left"
    write_random_dataset(out, n=3, size=8)
    with pytest.raises(DataError, match="already exists"):
        DatasetWriter(out, image_size=8, classes=["a"], source="t", split="all")
    with DatasetWriter(out, image_size=8, classes=["a"], source="t", split="all",
                       overwrite=True) as w:
        w.add(np.zeros((8, 8, 3), np.uint8), ["only"], class_id=0, name="one")
    with Dataset(out) as ds:
        assert len(ds) == 1 and ds[0].captions == ["only"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.lmdb"]
    assert sorted(p.name for p in out.iterdir()) == ["data.mdb"], "no lock file shipped"


@pytest.mark.parametrize("image, captions, class_id, message", [
    (np.zeros((8, 8, 3), np.uint8), [], 0, "at least one non-empty caption"),
    (np.zeros((8, 8, 3), np.uint8), ["  "], 0, "at least one non-empty caption"),
    (np.zeros((8, 8, 3), np.uint8), ["a\nb"], 0, "line break"),
    (np.zeros((8, 9, 3), np.uint8), ["a"], 0, r"must be uint8 \[8, 8, 3\]"),
    (np.zeros((8, 8, 3), np.uint8), ["a"], 2, "class id 2 outside"),
])
def test_writer_rejects_bad_records_naming_them(tmp_path, image, captions, class_id, message):
    with pytest.raises(DataError, match=f"bad one: .*{message}"):
        with DatasetWriter(tmp_path / "d.lmdb", image_size=8, classes=["a", "b"], source="t",
                           split="all") as w:
            w.add(image, captions, class_id=class_id, name="bad one")
    assert not (tmp_path / "d.lmdb").exists()


def test_other_format_version_is_refused(tmp_path):
    import lmdb

    path = write_random_dataset(tmp_path / "d.lmdb", n=3, size=8)
    env = lmdb.open(str(path), lock=False)
    with env.begin(write=True) as txn:
        meta = json.loads(txn.get(b"__meta__"))
        meta["format_version"] = 99
        txn.put(b"__meta__", json.dumps(meta).encode())
    env.close()
    with pytest.raises(DataError, match="format version 99"):
        Dataset(path)
