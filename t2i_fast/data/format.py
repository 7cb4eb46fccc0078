"""The on-disk dataset format (docs/format.md): one LMDB environment, a JSON metadata record
under ``__meta__`` and one binary record per image under an 8-digit key.

The C++ loader (csrc/record.cpp) reads the same layout; keep the two in step.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import numpy as np
from PIL import Image, JpegImagePlugin

from t2i_fast.data.alphabet import ALPHABET, ALPHABET_SIZE
from t2i_fast.errors import CorruptRecordError, DataError

FORMAT_VERSION = 1
META_KEY = b"__meta__"
MAGIC = b"T2IR"
ENCODINGS = ("raw", "jpeg")
PIXEL_FORMAT = "uint8 RGB, HWC"
MAX_CAPTIONS = 255  # caption ids are drawn from a 256-entry table (csrc/sampling.h)
MAX_IMAGE_SIZE = 4096  # the writer refuses larger; a reader never sizes a buffer beyond it

# magic, version, encoding, channels, height, width, class id, captions, doc length,
# name bytes, pixel bytes, text bytes, attribute bytes; then zeros up to the CRC at byte 60.
_HEADER = struct.Struct("<4sHBBHHIHHIIII")
HEADER_BYTES = 64
_CRC_OFFSET = 60


def record_key(index: int) -> bytes:
    return b"%08d" % index


def record_crc(record: bytes | memoryview) -> int:
    """CRC-32 of the record without its own CRC field."""
    return zlib.crc32(record[HEADER_BYTES:], zlib.crc32(record[:_CRC_OFFSET]))


@dataclass(frozen=True)
class RecordSpec:
    """What every record of a dataset must agree with: its metadata's fields."""

    height: int
    width: int
    doc_length: int
    encoding: str
    num_classes: int

    @classmethod
    def of(cls, meta: dict) -> RecordSpec:
        """From metadata that ``validate_metadata`` accepted."""
        height, width = meta["image_size"]
        return cls(height=height, width=width, doc_length=meta["doc_length"],
                   encoding=meta["encoding"], num_classes=len(meta["classes"]))


@dataclass
class Record:
    """One image with its captions, as stored."""

    class_id: int
    name: str
    captions: list[str]
    char_indices: np.ndarray  # uint8 [captions, doc length]
    pixels: bytes  # raw HWC uint8, or one JPEG file
    height: int
    width: int
    encoding: str = "raw"
    attributes: dict = field(default_factory=dict)

    def pack(self) -> bytes:
        name = self.name.encode()
        text = "\n".join(self.captions).encode()
        attrs = json.dumps(self.attributes, sort_keys=True).encode() if self.attributes else b""
        n_captions, doc_length = self.char_indices.shape
        header = _HEADER.pack(
            MAGIC, FORMAT_VERSION, ENCODINGS.index(self.encoding), 3, self.height, self.width,
            self.class_id, n_captions, doc_length, len(name), len(self.pixels), len(text),
            len(attrs),
        )
        header = header.ljust(_CRC_OFFSET, b"\0")
        payload = b"".join(
            (np.ascontiguousarray(self.char_indices, dtype=np.uint8).tobytes(), self.pixels,
             name, text, attrs)
        )
        crc = zlib.crc32(payload, zlib.crc32(header))
        return header + struct.pack("<I", crc) + payload

    @classmethod
    def unpack(cls, data: bytes | memoryview, *, where: str,
               spec: RecordSpec | None = None) -> Record:
        """Parse and check one record; ``where`` names it in errors (file and key). With
        ``spec`` the record must also agree with its dataset's metadata. The checks and their
        messages are csrc/record.cpp's, plus the fields only Python reads (name, text,
        attributes); the pixels are checked when decoded (``image``)."""
        data = memoryview(data)
        if len(data) < HEADER_BYTES:
            raise CorruptRecordError(f"{where}: truncated record ({len(data)} bytes)")
        (magic, version, encoding, channels, height, width, class_id, n_captions, doc_length,
         n_name, n_pixels, n_text, n_attrs) = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise CorruptRecordError(f"{where}: not a t2i-fast record (bad magic)")
        if version != FORMAT_VERSION:
            raise CorruptRecordError(f"{where}: record format version {version}, expected "
                                     f"{FORMAT_VERSION}")
        expected = HEADER_BYTES + n_captions * doc_length + n_pixels + n_name + n_text + n_attrs
        if len(data) != expected or encoding >= len(ENCODINGS) or channels != 3:
            raise CorruptRecordError(f"{where}: truncated or malformed record "
                                     f"({len(data)} bytes, header says {expected})")
        if not 1 <= n_captions <= MAX_CAPTIONS:
            raise CorruptRecordError(f"{where}: {n_captions} captions (the loader takes 1 to "
                                     f"{MAX_CAPTIONS})")
        if spec is not None:
            _check_against(spec, where, encoding=ENCODINGS[encoding], height=height,
                           width=width, doc_length=doc_length, class_id=class_id)
        if ENCODINGS[encoding] == "raw" and n_pixels != height * width * 3:
            raise CorruptRecordError(f"{where}: raw pixel bytes do not match "
                                     f"{height}x{width}x3")
        at = HEADER_BYTES
        chars = np.frombuffer(data[at: at + n_captions * doc_length], dtype=np.uint8)
        if chars.size and chars.max() > ALPHABET_SIZE:
            raise CorruptRecordError(f"{where}: character index {chars.max()} outside the "
                                     f"alphabet (1 to {ALPHABET_SIZE}, 0 for padding)")
        (crc,) = struct.unpack_from("<I", data, _CRC_OFFSET)
        if record_crc(data) != crc:
            raise CorruptRecordError(f"{where}: checksum mismatch (corrupt record)")
        at += n_captions * doc_length
        pixels = bytes(data[at: at + n_pixels])
        at += n_pixels
        name = _utf8(data[at: at + n_name], where, "name")
        at += n_name
        text = _utf8(data[at: at + n_text], where, "caption text")
        at += n_text
        captions = text.split("\n")
        if len(captions) != n_captions:
            raise CorruptRecordError(f"{where}: caption text holds {len(captions)} lines, the "
                                     f"header says {n_captions} captions")
        attrs = {}
        if n_attrs:
            try:
                attrs = json.loads(_utf8(data[at: at + n_attrs], where, "attributes"))
            except ValueError as exc:
                raise CorruptRecordError(f"{where}: attributes are not JSON: {exc}") from exc
            if not isinstance(attrs, dict):
                raise CorruptRecordError(f"{where}: attributes are not a JSON object")
        return cls(
            class_id=class_id, name=name, captions=captions,
            char_indices=chars.reshape(n_captions, doc_length).copy(), pixels=pixels,
            height=height, width=width, encoding=ENCODINGS[encoding], attributes=attrs,
        )

    def image(self, *, where: str) -> np.ndarray:
        """uint8 [H, W, 3]; a JPEG that does not decode to ``height`` x ``width`` RGB raises
        CorruptRecordError naming ``where``, as the C++ loader does."""
        if self.encoding == "raw":
            return np.frombuffer(self.pixels, dtype=np.uint8).reshape(self.height, self.width, 3)
        try:
            # The plugin class, not Image.open: the header's claims are checked here before
            # anything is decoded, and Image.open's decompression-bomb error would come first.
            with JpegImagePlugin.JpegImageFile(io.BytesIO(self.pixels)) as img:
                width, height = img.size
                if (height, width) != (self.height, self.width) or img.mode != "RGB":
                    raise CorruptRecordError(
                        f"{where}: JPEG is {height}x{width} with {len(img.getbands())} colour "
                        f"components, the dataset stores {self.height}x{self.width} RGB")
                return np.asarray(img)
        except (OSError, SyntaxError, ValueError) as exc:
            raise CorruptRecordError(f"{where}: JPEG does not decode: {exc}") from exc


def _check_against(spec: RecordSpec, where: str, *, encoding: str, height: int, width: int,
                   doc_length: int, class_id: int) -> None:
    """A record's header against its dataset's metadata (csrc/record.cpp's messages)."""
    if encoding != spec.encoding:
        raise CorruptRecordError(f"{where}: {encoding} pixels, the dataset's encoding is "
                                 f"{spec.encoding}")
    if (height, width) != (spec.height, spec.width):
        raise CorruptRecordError(f"{where}: image {height}x{width}, the dataset's image_size "
                                 f"is {spec.height}x{spec.width}")
    if doc_length != spec.doc_length:
        raise CorruptRecordError(f"{where}: document length {doc_length}, the dataset's "
                                 f"doc_length is {spec.doc_length}")
    if class_id >= spec.num_classes:
        raise CorruptRecordError(f"{where}: class id {class_id} outside the dataset's "
                                 f"{spec.num_classes} classes")


def _utf8(data: memoryview, where: str, what: str) -> str:
    try:
        return bytes(data).decode()
    except UnicodeDecodeError as exc:
        raise CorruptRecordError(f"{where}: {what} is not UTF-8: {exc}") from exc


def encode_pixels(image: np.ndarray, encoding: str, *, jpeg_quality: int = 95) -> bytes:
    """uint8 [H, W, 3] → the stored pixel bytes of ``encoding``."""
    if encoding == "raw":
        return np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    # 4:4:4 keeps the colour edges the small shapes and CUB's plumage depend on.
    Image.fromarray(image).save(buf, format="JPEG", quality=jpeg_quality, subsampling=0)
    return buf.getvalue()


# py-lmdb allows one Environment per file and process, so readers share it, counted.
_OPEN_ENVS: dict[str, list] = {}


def open_env(path: str | Path) -> lmdb.Environment:
    """Open a dataset read-only, with no lock file (read-only media work); pair with
    ``close_env``."""
    path = Path(path)
    if not (path / "data.mdb").is_file():
        raise DataError(f"{path}: not a t2i-fast dataset (no data.mdb; make one with "
                        "'t2i-fast prepare')")
    key = str(path.resolve())
    entry = _OPEN_ENVS.get(key)
    if entry is None:
        try:
            env = lmdb.open(key, readonly=True, lock=False, readahead=False, max_readers=512)
        except lmdb.Error as exc:
            raise DataError(f"{path}: cannot open as LMDB: {exc}") from exc
        try:
            check_not_truncated(env, path)
        except BaseException:
            env.close()
            raise
        entry = _OPEN_ENVS[key] = [env, 0]
    entry[1] += 1
    return entry[0]


def close_env(env: lmdb.Environment) -> None:
    for key, entry in list(_OPEN_ENVS.items()):
        if entry[0] is env:
            entry[1] -= 1
            if entry[1] == 0:
                del _OPEN_ENVS[key]
                env.close()
            return


def check_not_truncated(env: lmdb.Environment, path: str | Path) -> None:
    """The environment's last used page must lie inside data.mdb: LMDB maps the file, and
    reading a page of a copy cut short kills the process with SIGBUS. csrc/lmdb_store.cpp
    makes the same check with the same message."""
    file = Path(path) / "data.mdb"
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    have = file.stat().st_size
    if have < need:
        raise CorruptRecordError(f"{file}: truncated ({have} bytes, its last page ends at byte "
                                 f"{need}); copy the dataset again")


def read_metadata(env: lmdb.Environment, path: str | Path) -> dict:
    """The dataset's metadata, checked (``validate_metadata``) against the LMDB's entries and
    against record 0: every reader opens through here."""
    with env.begin(buffers=False) as txn:
        raw = txn.get(META_KEY)
        first = txn.get(record_key(0))
    if raw is None:
        raise DataError(f"{path}: LMDB without a t2i-fast metadata record ('__meta__')")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise CorruptRecordError(f"{path}: metadata record '__meta__' is not JSON: {exc}") from exc
    validate_metadata(meta, path)
    where = f"{path}: metadata record '__meta__'"
    records = env.stat()["entries"] - 1
    if meta["count"] != records:
        # The message matches csrc/lmdb_store.cpp's.
        raise CorruptRecordError(f"{where} says {meta['count']} records, the LMDB holds "
                                 f"{records} besides it")
    if first is None:
        raise CorruptRecordError(f"{path}: record '{record_key(0).decode()}' is missing")
    Record.unpack(first, where=f"{path}: record '{record_key(0).decode()}'",
                  spec=RecordSpec.of(meta))
    return meta


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_list(value, item, length: int | None = None) -> bool:
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(item(v) for v in value))


def validate_metadata(meta, path: str | Path) -> None:
    """Every field a reader uses, with its type and range: a forged or damaged metadata
    record fails here with one error naming the field, not later as a KeyError, a misaligned
    caption or an allocation of terabytes."""
    where = f"{path}: metadata record '__meta__'"
    if not isinstance(meta, dict):
        raise CorruptRecordError(f"{where} is not a JSON object (a {type(meta).__name__})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"{path}: dataset format version {_short(version)}, this t2i-fast reads "
                        f"version {FORMAT_VERSION}; re-create it with 't2i-fast prepare'")
    if meta.get("alphabet") != ALPHABET:
        raise DataError(f"{path}: dataset was encoded with another alphabet")

    def is_str(v) -> bool:
        return isinstance(v, str)

    def count(v) -> bool:
        return _is_int(v, 0, 2**32 - 1)

    required = {
        "count": (lambda v: _is_int(v, 1, 2**40), "a positive integer"),
        "image_size": (lambda v: _is_list(v, lambda x: _is_int(x, 1, MAX_IMAGE_SIZE), 2),
                       f"[height, width], each in [1, {MAX_IMAGE_SIZE}]"),
        "encoding": (lambda v: v in ENCODINGS, f"one of {list(ENCODINGS)}"),
        "pixel_format": (lambda v: v == PIXEL_FORMAT, repr(PIXEL_FORMAT)),
        "doc_length": (lambda v: _is_int(v, 1, 65535), "an integer in [1, 65535]"),
        "classes": (lambda v: _is_list(v, is_str) and 1 <= len(v) <= 2**32,
                    "a non-empty list of names"),
        "split": (is_str, "a string"),
        "captions_per_image": (lambda v: _is_int(v, 1, MAX_CAPTIONS),
                               f"an integer in [1, {MAX_CAPTIONS}]"),
    }
    optional = {
        "captions_per_image_max": required["captions_per_image"],
        "class_counts": (lambda v: _is_list(v, count, len(meta["classes"])),
                         "a count for each class"),
        "holdout": (lambda v: _is_list(v, is_str), "a list of strings"),
    }
    for name, (ok, what) in required.items():
        if name not in meta:
            raise CorruptRecordError(f"{where} has no '{name}' field")
        if not ok(meta[name]):
            raise CorruptRecordError(f"{where}: '{name}' must be {what}, got "
                                     f"{_short(meta[name])}")
    for name, (ok, what) in optional.items():
        if name in meta and not ok(meta[name]):
            raise CorruptRecordError(f"{where}: '{name}' must be {what}, got "
                                     f"{_short(meta[name])}")
