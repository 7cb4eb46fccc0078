"""Where commands write pictures and pages: like ``train --run`` and ``pretrain-text --out``,
they make the folders an output path names."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from t2i_fast.errors import T2IError


def output_folder(path: Path) -> Path:
    """Folder ``path``, made where missing; a T2IError naming what stands in the way."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise T2IError(f"{path}: cannot make this folder ({exc.strerror or exc})") from exc
    return path


def output_file(path: Path) -> Path:
    """``path``, its folder made where missing."""
    output_folder(path.parent)
    return path


def save_image(image: Image.Image, path: Path) -> None:
    """Writes ``image`` in the format of ``path``'s extension."""
    output_file(path)
    try:
        image.save(path)
    except ValueError as exc:  # Pillow: an extension it does not write
        raise T2IError(f"{path}: cannot write a picture of this kind ({exc}); name a "
                       ".png") from exc
    except OSError as exc:
        raise T2IError(f"{path}: cannot write ({exc.strerror or exc})") from exc
