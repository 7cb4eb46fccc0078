"""Loading whatever images users have (any mode Pillow reads, EXIF-rotated, with alpha) as
square uint8 RGB, and writing a list of them through a process pool."""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from t2i_fast.data.writer import DatasetWriter
from t2i_fast.errors import DataError
from t2i_fast.prepare import progress
from t2i_fast.prepare.files import MAX_IMAGE_BYTES, open_regular

# Raster formats Pillow decodes itself; its full registry also claims extensions such as .h5
# (Reed's text embeddings) or .mpg that it can only identify, not read.
_COMMON_EXTENSIONS = {
    ".apng", ".avif", ".bmp", ".dib", ".gif", ".ico", ".j2k", ".jfif", ".jp2", ".jpe", ".jpeg",
    ".jpg", ".pbm", ".pcx", ".pgm", ".png", ".pnm", ".ppm", ".psd", ".qoi", ".sgi", ".tga",
    ".tif", ".tiff", ".webp",
}
IMAGE_EXTENSIONS = frozenset(_COMMON_EXTENSIONS & set(Image.registered_extensions()))

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


@dataclass(frozen=True)
class ImageJob:
    """One image to write. ``bbox`` (x, y, w, h in pixels) asks for a crop around it."""

    path: Path
    captions: list[str]
    class_id: int
    name: str
    bbox: tuple[float, float, float, float] | None = None


def load_image(path: Path, size: int, bbox: tuple[float, float, float, float] | None = None
               ) -> np.ndarray:
    """uint8 [size, size, 3]: the whole image squashed to a square (Reed's preprocessing), or,
    with ``bbox``, a square of side 1.5·max(w, h) centred on the box, clipped to the image."""
    file = open_regular(path, limit=MAX_IMAGE_BYTES, what="image")
    try:
        with file, Image.open(file) as img:
            if bbox is None:
                # JPEG decodes straight to 1/2..1/8 scale, several times faster on large photos;
                # keeping at least twice the target size leaves the filtering to LANCZOS.
                img.draft(None, (2 * size, 2 * size))
            ImageOps.exif_transpose(img, in_place=True)
            rgb = _to_rgb(img)
    except Exception as exc:
        # Pillow reports broken files through many exception types (OSError, SyntaxError,
        # ValueError, struct.error, ...); all mean the same to the user.
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    box = None
    if bbox is not None:
        box = _crop_box(bbox, *rgb.size)
        if box is None:
            raise DataError(f"{path}: bounding box {list(bbox)} lies outside the "
                            f"{rgb.width}x{rgb.height} image")
    resized = rgb.resize((size, size), Image.Resampling.LANCZOS, box=box)
    return np.asarray(resized, dtype=np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _SIXTEEN_BIT or img.mode in ("I", "F"):
        values = np.asarray(img, dtype=np.float64)
        # Pillow's own conversion clips 16-bit values at 255, turning most pixels white.
        if img.mode in _SIXTEEN_BIT or values.max(initial=0) > 255:
            values = values / 257
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        # Transparent pixels keep arbitrary colours; compositing over white before resizing
        # keeps them from bleeding into the edges.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _crop_box(bbox: tuple[float, float, float, float], width: int, height: int
              ) -> tuple[float, float, float, float] | None:
    x, y, w, h = bbox
    half = 0.75 * max(w, h)
    cx, cy = x + w / 2, y + h / 2
    left, top = max(0.0, cx - half), max(0.0, cy - half)
    right, bottom = min(float(width), cx + half), min(float(height), cy + half)
    if right <= left or bottom <= top:
        return None
    return left, top, right, bottom


def _decode(item: tuple[Path, tuple | None], size: int) -> np.ndarray:
    path, bbox = item
    return load_image(path, size, bbox)


def _init_worker() -> None:
    # The parent alone reacts to Ctrl-C and kills: it stops the pool and removes the temporary
    # dataset, while workers would only print tracebacks (or, with an inherited handler, fail
    # to stop when the pool terminates them).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _ordered_map(workers: int) -> Iterator[Callable]:
    if workers <= 1:
        yield map
        return
    # fork on Linux: spawn and forkserver re-import the main module in every worker, which runs
    # the whole command again under 'python -m t2i_fast' or an unguarded user script. Elsewhere
    # fork is unsafe (macOS system libraries) or missing (Windows).
    method = "fork" if sys.platform.startswith("linux") else None
    with multiprocessing.get_context(method).Pool(workers, _init_worker) as pool:
        yield functools.partial(pool.imap, chunksize=8)


def write_images(writer: DatasetWriter, jobs: list[ImageJob], *, workers: int,
                 label: str) -> None:
    """Decode and resize ``jobs`` on ``workers`` processes and add them to ``writer`` in order.
    The first unreadable image raises its DataError; the pool is stopped on the way out."""
    decode = functools.partial(_decode, size=writer.image_size)
    items = [(job.path, job.bbox) for job in jobs]
    with _ordered_map(min(workers, len(jobs))) as ordered_map, progress(len(jobs), label) as bar:
        for job, image in zip(jobs, ordered_map(decode, items), strict=True):
            writer.add(image, job.captions, class_id=job.class_id, name=job.name)
            bar.update(1)
