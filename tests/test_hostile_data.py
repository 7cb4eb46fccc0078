"""Forged and broken datasets: every kind of bad header field, length, character byte and
metadata field (each record with a recomputed CRC, so only the checks can catch it) and a
truncated data.mdb end in one T2IError naming the file (and the key where a record is at
fault) from Dataset, from the Loader and from `t2i-fast stream`.

Each dataset is probed in a child process (this file run as a script): on code without the
checks a forged record writes out of bounds, allocates gigabytes or dies of SIGBUS, and a
dead child is a failed test, not a dead pytest."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np
import pytest
from conftest import write_random_dataset
from PIL import Image

from t2i_fast.data.format import HEADER_BYTES, META_KEY, Record, record_crc, record_key

SIZE, COUNT, BAD = 16, 8, 5  # image size, records, the forged record (not record 0)


# -- forging ---------------------------------------------------------------------------------
def reseal(data: bytes) -> bytes:
    """The record with its CRC recomputed over the forged bytes."""
    return data[:60] + struct.pack("<I", record_crc(data)) + data[64:]


def patch(offset: int, fmt: str, *values):
    """A forgery that overwrites header fields."""
    def change(data: bytes) -> bytes:
        return data[:offset] + struct.pack(fmt, *values) + data[offset + struct.calcsize(fmt):]
    return change


def sections(data: bytes) -> dict[str, tuple[int, int]]:
    """Start and end of each variable-length section of a record."""
    n, length, name, pixels, text, attrs = struct.unpack_from("<HHIIII", data, 16)
    out, at = {}, HEADER_BYTES
    for section, size in (("chars", n * length), ("pixels", pixels), ("name", name),
                          ("text", text), ("attrs", attrs)):
        out[section] = (at, at + size)
        at += size
    return out


def replace_section(section: str, new: bytes):
    """A forgery that swaps one section's bytes and sets its length field to match."""
    field = {"pixels": 24, "name": 20, "text": 28, "attrs": 32}[section]

    def change(data: bytes) -> bytes:
        start, end = sections(data)[section]
        data = data[:start] + new + data[end:]
        return patch(field, "<I", len(new))(data)
    return change


def set_chars(value: int):
    """A forgery that puts ``value`` at position 3 of every caption."""
    def change(data: bytes) -> bytes:
        n, length = struct.unpack_from("<HH", data, 16)
        chars = np.frombuffer(data, np.uint8, n * length, HEADER_BYTES).reshape(n, length).copy()
        chars[:, 3] = value
        return data[:HEADER_BYTES] + chars.tobytes() + data[HEADER_BYTES + chars.size:]
    return change


def zero_captions(data: bytes) -> bytes:
    start, end = sections(data)["chars"]
    return patch(16, "<H", 0)(data[:start] + data[end:])


def jpeg(image: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).convert(mode).save(buf, format="JPEG")
    return buf.getvalue()


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_claiming(height: int, width: int):
    """The record's own JPEG with its SOF header claiming another size."""
    def change(data: bytes) -> bytes:
        start, end = sections(data)["pixels"]
        pixels = bytearray(data[start:end])
        sof = pixels.index(b"\xff\xc0")
        pixels[sof + 5: sof + 9] = struct.pack(">HH", height, width)
        return data[:start] + bytes(pixels) + data[end:]
    return change


def repack(**fields):
    """The record re-encoded by the format's own packer with some fields changed."""
    def change(data: bytes) -> bytes:
        record = Record.unpack(data, where="forging")
        for name, value in fields.items():
            value = value(record) if callable(value) else value
            setattr(record, name, value)
        return record.pack()
    return change


def image(seed: int = 0, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def rewrite_record(path: Path, index: int, change) -> None:
    with lmdb.open(str(path), lock=False) as env, env.begin(write=True) as txn:
        key = record_key(index)
        txn.put(key, reseal(change(bytes(txn.get(key)))))


def rewrite_meta(path: Path, change) -> None:
    with lmdb.open(str(path), lock=False) as env, env.begin(write=True) as txn:
        meta = json.loads(txn.get(META_KEY))
        meta = change(meta) or meta
        txn.put(META_KEY, json.dumps(meta).encode())


def truncate(path: Path) -> None:
    file = path / "data.mdb"
    with lmdb.open(str(path), lock=False, readonly=True) as env:
        pages = env.info()["last_pgno"] + 1
        page = env.stat()["psize"]
    assert pages > 6, "a dataset of several pages, so that records lie beyond the cut"
    os.truncate(file, 4 * page)


# -- the cases -------------------------------------------------------------------------------
KEY = f"record '{BAD:08d}'"
EVERY = ("dataset", "loader", "cli")


@dataclass
class Case:
    name: str
    forge: object  # a record forgery (bytes -> bytes) or a metadata change (dict -> dict)
    message: str  # a regular expression the error must match after the dataset's path
    encoding: str = "raw"
    on: str = "record"  # record, meta or file
    fails: tuple = EVERY  # the entry points that read what is forged

    def apply(self, path: Path) -> None:
        if self.on == "record":
            rewrite_record(path, BAD, self.forge)
        elif self.on == "meta":
            rewrite_meta(path, self.forge)
        else:
            self.forge(path)


def meta_set(**fields):
    return lambda meta: {**meta, **fields}


def meta_without(name):
    return lambda meta: {k: v for k, v in meta.items() if k != name}


ONLY_DATASET = ("dataset",)  # fields the C++ loader never reads
CASES = [
    # character bytes; 72 makes the probe's one-hot write land just past its slot's end, where
    # AddressSanitizer sees it (71 lands inside the slot, 255 far beyond it)
    Case("char-71", set_chars(71), f"{KEY}: character index 71 outside the alphabet"),
    Case("char-72", set_chars(72), f"{KEY}: character index 72 outside the alphabet"),
    Case("char-255", set_chars(255), f"{KEY}: character index 255 outside the alphabet"),
    # header fields
    Case("class-1e8", patch(12, "<I", 10**8), f"{KEY}: class id 100000000 outside the dataset's "
         "3 classes"),
    Case("class-2^32-1", patch(12, "<I", 2**32 - 1), f"{KEY}: class id 4294967295 outside"),
    Case("header-16000", patch(8, "<HH", 16000, 16000), f"{KEY}: image 16000x16000, the "
         "dataset's image_size is 16x16", encoding="jpeg"),
    Case("raw-16000", patch(8, "<HH", 16000, 16000), f"{KEY}: image 16000x16000"),
    Case("doc-length", repack(char_indices=lambda r: r.char_indices[:, :-1]),
         f"{KEY}: document length 200, the dataset's doc_length is 201"),
    Case("no-captions", zero_captions, f"{KEY}: 0 captions"),
    Case("encoding-byte", patch(6, "<B", 7), f"{KEY}: truncated or malformed"),
    Case("channels", patch(7, "<B", 4), f"{KEY}: truncated or malformed"),
    Case("version", patch(4, "<H", 2), f"{KEY}: record format version 2"),
    # lengths
    Case("text-length", patch(28, "<I", 2**32 - 1), f"{KEY}: truncated or malformed"),
    Case("pixel-length", replace_section("pixels", bytes(10)), f"{KEY}: raw pixel bytes"),
    # pixels
    Case("raw-in-jpeg", repack(encoding="raw", pixels=image().tobytes()),
         f"{KEY}: raw pixels, the dataset's encoding is jpeg", encoding="jpeg"),
    Case("jpeg-claims-16000", jpeg_claiming(16000, 16000), f"{KEY}: JPEG is 16000x16000 with 3 "
         "colour components, the dataset stores 16x16 RGB", encoding="jpeg"),
    Case("jpeg-wrong-size", replace_section("pixels", jpeg(image(size=12))),
         f"{KEY}: JPEG is 12x12 with 3 colour components", encoding="jpeg"),
    Case("jpeg-cmyk", replace_section("pixels", jpeg(image(), "CMYK")),
         f"{KEY}: JPEG is 16x16 with 4 colour components", encoding="jpeg"),
    Case("jpeg-grey", replace_section("pixels", jpeg(image(), "L")),
         f"{KEY}: JPEG is 16x16 with 1 colour components", encoding="jpeg"),
    Case("png", replace_section("pixels", png(image())), f"{KEY}: JPEG does not decode",
         encoding="jpeg"),
    # what only Dataset reads
    Case("name-not-utf8", replace_section("name", b"\xff\xfe"), f"{KEY}: name is not UTF-8",
         fails=ONLY_DATASET),
    Case("text-not-utf8", replace_section("text", b"a \xff bird"),
         f"{KEY}: caption text is not UTF-8", fails=ONLY_DATASET),
    Case("text-lines", replace_section("text", b"a\nb\nc\nd\ne\nf\ng"),
         f"{KEY}: caption text holds 7 lines", fails=ONLY_DATASET),
    Case("attributes-not-json", replace_section("attrs", b"{not json"),
         f"{KEY}: attributes are not JSON", fails=ONLY_DATASET),
    Case("attributes-a-list", replace_section("attrs", b"[1, 2]"),
         f"{KEY}: attributes are not a JSON object", fails=ONLY_DATASET),
    # the metadata
    Case("meta-doc-length", meta_set(doc_length=202), "record '00000000': document length 201, "
         "the dataset's doc_length is 202", on="meta"),
    Case("meta-count-1e12", meta_set(count=10**12), "metadata record '__meta__' says "
         f"1000000000000 records, the LMDB holds {COUNT} besides it", on="meta"),
    Case("meta-count-float", meta_set(count=1e12),
         "metadata record '__meta__': 'count' must be a positive integer", on="meta"),
    Case("meta-no-image-size", meta_without("image_size"), "metadata record '__meta__' has no "
         "'image_size' field", on="meta"),
    Case("meta-image-size-16000", meta_set(image_size=[16000, 16000]),
         "metadata record '__meta__': 'image_size' must be "
         r"\[height, width\], each in \[1, 4096\]", on="meta"),
    Case("meta-image-size-other", meta_set(image_size=[12, 12]), "record '00000000': image "
         "16x16, the dataset's image_size is 12x12", on="meta"),
    Case("meta-a-list", lambda meta: [meta], "metadata record '__meta__' is not a JSON object "
         r"\(a list\)", on="meta"),
    Case("meta-classes-short", meta_set(classes=["class0"], class_counts=[COUNT]),
         r"record '\d{8}': class id [12] outside the dataset's 1 classes", on="meta"),
    Case("meta-classes-a-string", meta_set(classes="abc"),
         "metadata record '__meta__': 'classes' must be a non-empty list",
         on="meta"),
    Case("meta-encoding", meta_set(encoding="jpeg"), "record '00000000': raw pixels, the "
         "dataset's encoding is jpeg", on="meta"),
    Case("meta-no-split", meta_without("split"),
         "metadata record '__meta__' has no 'split' field", on="meta"),
    # the file
    Case("truncated", truncate, r"truncated \(\d+ bytes, its last page ends at byte "
         r"\d+\); copy the dataset again", on="file"),
]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clean")
    return {encoding: write_random_dataset(root / f"{encoding}.lmdb", n=COUNT, size=SIZE,
                                           classes=3, encoding=encoding, seed=1)
            for encoding in ("raw", "jpeg")}


def probe(*args: str) -> tuple[list[dict], str]:
    """This file run as a script: one JSON line per dataset it probed, and what the child
    wrote to stderr when it died."""
    import t2i_fast

    root = str(Path(t2i_fast.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    child = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                           timeout=600, env=env)
    results = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    report = child.stderr
    if len(report) > 8000:  # a sanitizer's report starts with the faulting access
        report = f"{report[:4000]}\n...\n{report[-4000:]}"
    died = "" if child.returncode == 0 else f"the probe died (status {child.returncode}):\n{report}"
    return results, died


@pytest.fixture(scope="module")
def probed(clean, tmp_path_factory) -> dict[str, dict | str]:
    """Each case's forged dataset probed: its results, or why the probe died on it. One child
    probes them all in turn; when one kills it, a new child goes on from the next."""
    root = tmp_path_factory.mktemp("forged")
    paths = {}
    for case in CASES:
        paths[case.name] = shutil.copytree(clean[case.encoding], root / f"{case.name}.lmdb")
        case.apply(paths[case.name])
    out: dict[str, dict | str] = {}
    pending = [case.name for case in CASES]
    while pending:
        results, died = probe(*(str(paths[name]) for name in pending))
        for name, result in zip(pending, results, strict=False):
            out[name] = {**result, "path": str(paths[name])}
        pending = pending[len(results):]
        if pending:
            out[pending.pop(0)] = died or "the probe stopped without a result"
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forged_dataset_gives_one_clean_error(probed, case):
    got = probed[case.name]
    assert isinstance(got, dict), got
    expected = re.escape(got["path"]) + r"(/data\.mdb)?: " + case.message
    for entry in ("dataset", "loader"):
        error = got[entry]
        if entry not in case.fails:
            assert error is None, f"{entry} reads no forged field, yet: {error}"
            continue
        assert error is not None, f"{entry} accepted the forged dataset"
        assert error["t2i"], f"{entry} raised {error['type']}, not a T2IError: {error['message']}"
        assert re.fullmatch(expected + ".*", error["message"], re.S), (entry, error["message"])
    cli = got["cli"]
    if "cli" in case.fails:
        assert cli["exit_code"] == 1 and "Traceback" not in cli["output"], cli
        errors = [line for line in cli["output"].splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and re.fullmatch("Error: " + expected + ".*", errors[0]), cli
    else:
        assert cli["exit_code"] == 0, cli


def test_the_native_core_checks_on_its_own(clean, tmp_path):
    """The C++ store refuses a truncated file and a count the LMDB does not hold, with the
    Python messages, when opened without the Python checks in front."""
    truncated = shutil.copytree(clean["raw"], tmp_path / "truncated.lmdb")
    truncate(truncated)
    (got, *_), died = probe("--native", str(truncated), str(COUNT))
    assert not died, died
    assert re.fullmatch(re.escape(str(truncated)) + r"/data\.mdb: truncated \(\d+ bytes, its "
                        r"last page ends at byte \d+\); copy the dataset again",
                        got["message"]), got
    assert got["type"] == "CorruptRecordError"
    (got, *_), died = probe("--native", str(clean["raw"]), str(10**12))
    assert not died, died
    assert got["message"] == (f"{clean['raw']}: metadata record '__meta__' says 1000000000000 "
                              f"records, the LMDB holds {COUNT} besides it"), got


# -- the probe (this file as a script) -------------------------------------------------------
def _error(exc: Exception) -> dict:
    from t2i_fast.errors import T2IError

    return {"type": type(exc).__name__, "message": str(exc), "t2i": isinstance(exc, T2IError)}


def _native(path: str, count: int) -> dict | None:
    from t2i_fast import _C

    try:
        _C.Loader(path, count=count, num_classes=3, image_height=SIZE, image_width=SIZE,
                  doc_length=201, encoding="raw", batch_size=2, size=SIZE, captions_per_sample=1,
                  caption_format="onehot", elem_bytes=1, lut=bytes(range(256)), one=b"\x01",
                  nhwc=True, random_crop=True, flip=True, seed=0, rank=0, world_size=1,
                  drop_last=True, num_threads=1, verify=True)
    except Exception as exc:
        return _error(exc)
    return None


def _probe(path: str) -> dict:
    import torch
    from click.testing import CliRunner

    from t2i_fast.cli import main
    from t2i_fast.data import Dataset, Loader

    got = {}
    try:
        with Dataset(path) as ds:
            for i in range(len(ds)):
                ds[i]
        got["dataset"] = None
    except Exception as exc:
        got["dataset"] = _error(exc)
    try:  # float one-hot, one caption of one sample a slot: a bad character index writes
        # furthest from where it should, and past the slot's end
        with Loader(path, batch_size=1, captions_per_sample=1, dtype=torch.float32,
                    num_threads=2) as loader:
            for _ in range(2):
                for _batch in loader:
                    pass
        got["loader"] = None
    except Exception as exc:
        got["loader"] = _error(exc)
    result = CliRunner().invoke(main, ["stream", "--data", path, "--epochs", "1",
                                       "--batch-size", "2", "--dtype", "float32"])
    got["cli"] = {"exit_code": result.exit_code, "output": result.output}
    return got


if __name__ == "__main__":
    if sys.argv[1] == "--native":
        print(json.dumps(_native(sys.argv[2], int(sys.argv[3]))))
    else:
        for dataset in sys.argv[1:]:
            print(json.dumps(_probe(dataset)), flush=True)
