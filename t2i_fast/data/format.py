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
from PIL import Image

from t2i_fast.data.alphabet import ALPHABET
from t2i_fast.errors import CorruptRecordError, DataError

FORMAT_VERSION = 1
META_KEY = b"__meta__"
MAGIC = b"T2IR"
ENCODINGS = ("raw", "jpeg")

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
    def unpack(cls, data: bytes | memoryview, *, where: str) -> Record:
        """Parse and check one record; ``where`` names it in errors (file and key)."""
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
        (crc,) = struct.unpack_from("<I", data, _CRC_OFFSET)
        if record_crc(data) != crc:
            raise CorruptRecordError(f"{where}: checksum mismatch (corrupt record)")
        at = HEADER_BYTES
        chars = np.frombuffer(data[at: at + n_captions * doc_length], dtype=np.uint8)
        at += n_captions * doc_length
        pixels = bytes(data[at: at + n_pixels])
        at += n_pixels
        name = bytes(data[at: at + n_name]).decode()
        at += n_name
        text = bytes(data[at: at + n_text]).decode()
        at += n_text
        attrs = json.loads(bytes(data[at: at + n_attrs])) if n_attrs else {}
        return cls(
            class_id=class_id, name=name, captions=text.split("\n"),
            char_indices=chars.reshape(n_captions, doc_length).copy(), pixels=pixels,
            height=height, width=width, encoding=ENCODINGS[encoding], attributes=attrs,
        )

    def image(self) -> np.ndarray:
        """uint8 [H, W, 3]."""
        if self.encoding == "raw":
            return np.frombuffer(self.pixels, dtype=np.uint8).reshape(self.height, self.width, 3)
        with Image.open(io.BytesIO(self.pixels)) as img:
            return np.asarray(img.convert("RGB"))


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


def read_metadata(env: lmdb.Environment, path: str | Path) -> dict:
    with env.begin(buffers=False) as txn:
        raw = txn.get(META_KEY)
    if raw is None:
        raise DataError(f"{path}: LMDB without a t2i-fast metadata record ('__meta__')")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise CorruptRecordError(f"{path}: metadata record '__meta__' is not JSON: {exc}") from exc
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"{path}: dataset format version {version}, this t2i-fast reads "
                        f"version {FORMAT_VERSION}; re-create it with 't2i-fast prepare'")
    if meta.get("alphabet") != ALPHABET:
        raise DataError(f"{path}: dataset was encoded with another alphabet")
    return meta
