"""Reed's character alphabet, the caption → character-index encoding and its one-hot form.

Index 0 is padding and also every character outside the alphabet; indices 1..70 are 1-based
positions in ``ALPHABET`` as in Reed's Lua code, where '-' appears twice and the later
occurrence (index 60) wins, so index 37 never occurs. One-hot channel ``i - 1`` encodes
index ``i``; index 0 encodes as an all-zero column.
"""

from __future__ import annotations

import unicodedata

import numpy as np
import torch

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789-,;.!?:'\"/\\|_@#$%^&*~`+-=<>()[]{} "
ALPHABET_SIZE = len(ALPHABET)  # 70: the one-hot width
DEFAULT_DOC_LENGTH = 201

# Mapped characters land in Unicode plane 16 (private use), far from any code point a caption
# can hold, so one str.translate call turns a caption into indices without a Python-level loop.
_PLANE = 0x100000
_TABLE = {ord(ch): _PLANE + i + 1 for i, ch in enumerate(ALPHABET)}
# U+FFFD in Reed's CUB captions stands where a non-breaking space was lost in decoding.
_TABLE[0xFFFD] = _PLANE + ALPHABET.rindex(" ") + 1


def normalize(text: str) -> str:
    """Lower-case, strip accents (é → e) and turn every Unicode space into ' '."""
    text = text.lower()
    if text.isascii() and text.isprintable():
        return text
    text = unicodedata.normalize("NFKD", text)
    return "".join(" " if ch.isspace() else ch for ch in text if not unicodedata.combining(ch))


def encode(text: str, doc_length: int = DEFAULT_DOC_LENGTH) -> np.ndarray:
    """One caption → uint8 indices of length ``doc_length`` (truncated or zero-padded)."""
    mapped = normalize(text)[:doc_length].translate(_TABLE)
    codes = np.frombuffer(mapped.encode("utf-32-le"), dtype=np.uint32).astype(np.int64) - _PLANE
    out = np.zeros(doc_length, dtype=np.uint8)
    known = (codes >= 1) & (codes <= ALPHABET_SIZE)
    out[: codes.size] = np.where(known, codes, 0)
    return out


def encode_many(captions: list[str], doc_length: int = DEFAULT_DOC_LENGTH) -> np.ndarray:
    """Captions → uint8 ``[len(captions), doc_length]``."""
    out = np.zeros((len(captions), doc_length), dtype=np.uint8)
    for i, caption in enumerate(captions):
        out[i] = encode(caption, doc_length)
    return out


def decode(indices: np.ndarray) -> str:
    """Indices → text: trailing padding dropped, unknown characters shown as U+FFFD."""
    values = np.trim_zeros(np.asarray(indices, dtype=np.int64), "b").tolist()
    return "".join(ALPHABET[i - 1] if 1 <= i <= ALPHABET_SIZE else "\ufffd" for i in values)


def onehot(indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 character indices [..., L] → contiguous one-hot [..., 70, L]; index 0 (padding,
    unknown) gives an all-zero column."""
    idx = indices.long().unsqueeze(-2)  # [..., 1, L]
    out = torch.zeros(*indices.shape[:-1], ALPHABET_SIZE, indices.shape[-1], dtype=dtype,
                      device=indices.device)
    return out.scatter_(-2, (idx - 1).clamp_(min=0), (idx > 0).to(dtype))
