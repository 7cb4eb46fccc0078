"""Reading the small text files sources come with: caption files (one caption a line) and
class lists. Files come from many editors, so a UTF-8 byte-order mark, Windows or old Mac line
endings, blank lines and stray whitespace are all accepted; bytes that are not UTF-8 are not,
since guessing an encoding would silently corrupt captions."""

from __future__ import annotations

from pathlib import Path

from t2i_fast.errors import DataError
from t2i_fast.prepare.files import MAX_CAPTION_BYTES, MAX_LIST_BYTES, read_regular

# The C++ loader refuses records with more (kMaxCaptions, csrc/record.h); catching it here names
# the caption file instead of failing at training time.
MAX_CAPTIONS = 255


def read_lines(path: Path, *, limit: int = MAX_LIST_BYTES, what: str = "list file"
               ) -> list[tuple[int, str]]:
    """The non-blank lines of a UTF-8 text file of at most ``limit`` bytes as (1-based line
    number, stripped text)."""
    data = read_regular(path, limit=limit, what=what)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not valid UTF-8 (byte "
                        f"0x{data[exc.start]:02x}); save the file as UTF-8") from exc
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return [(i, line.strip()) for i, line in enumerate(lines, 1) if line.strip()]


def read_captions(path: Path) -> list[str]:
    """One caption per non-blank line; at least one and at most ``MAX_CAPTIONS``."""
    captions = [line for _, line in read_lines(path, limit=MAX_CAPTION_BYTES,
                                               what="caption file")]
    if not captions:
        raise DataError(f"{path}: no captions")
    if len(captions) > MAX_CAPTIONS:
        raise DataError(f"{path}: {len(captions)} captions, at most {MAX_CAPTIONS} per image")
    return captions


def read_class_list(path: Path, known: set[str] | None = None) -> list[str]:
    """A split file: one class (folder) name a line. With ``known``, every name must be in it."""
    if not path.is_file():
        raise DataError(f"{path}: split file missing")
    names = []
    for line_no, name in read_lines(path):
        if known is not None and name not in known:
            raise DataError(f"{path}: line {line_no}: unknown class {name!r}")
        names.append(name)
    if not names:
        raise DataError(f"{path}: no class names")
    return names
