"""Pictures people look at instead of numbers: image grids with their captions, and loss
curves. Drawn with Pillow alone (its bundled font), so nothing else needs installing."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

_BACKGROUND = (255, 255, 255)
_INK = (30, 30, 30)
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images [N, 3, H, W] in [-1, 1] (or uint8) → uint8 [N, H, W, 3]."""
    images = images.detach().cpu()
    if images.dtype != torch.uint8:
        images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).numpy()


def image_grid(images: torch.Tensor, *, rows: int, row_labels: Sequence[str] | None = None,
               column_labels: Sequence[str] | None = None, title: str | None = None,
               scale: int = 2, gap: int = 2) -> Image.Image:
    """Images [rows * cols, 3, H, W] row by row; each row's label is written under it, each
    column's above it, the title above all (wrapped to the grid's width)."""
    pixels = to_uint8(images)
    n, h, w, _ = pixels.shape
    cols = math.ceil(n / rows)
    cell_h, cell_w = h * scale, w * scale
    width = cols * (cell_w + gap) + gap
    font = _font(max(10, min(14, cell_w // 6)))
    chars = max(20, width // 7)
    row_text = [textwrap.wrap(label, chars)[:3] for label in (row_labels or [""] * rows)]
    col_text = [textwrap.wrap(label, max(8, cell_w // 7))[:3] for label in column_labels or []]
    line = font.size + 3
    title_text = textwrap.wrap(title, chars)[:3] if title else []
    header = (len(title_text) + max((len(t) for t in col_text), default=0)) * line
    heights = [cell_h + gap + len(t) * line + (gap if t else 0) for t in row_text]
    canvas = Image.new("RGB", (width, header + sum(heights) + gap), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for k, part in enumerate(title_text):
        draw.text((gap, k * line), part, fill=_INK, font=font)
    for c, text in enumerate(col_text):
        for k, part in enumerate(text):
            draw.text((gap + c * (cell_w + gap), (len(title_text) + k) * line), part,
                      fill=_INK, font=font)
    y = header + gap
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            if i < n:
                tile = Image.fromarray(pixels[i]).resize((cell_w, cell_h), Image.NEAREST)
                canvas.paste(tile, (gap + c * (cell_w + gap), y))
        for k, part in enumerate(row_text[r]):
            draw.text((gap, y + cell_h + gap + k * line), part, fill=_INK, font=font)
        y += heights[r]
    return canvas


def line_plot(series: dict[str, Sequence[tuple[float, float]]], *, title: str,
              x_label: str, size: tuple[int, int] = (720, 420)) -> Image.Image:
    """Each named series of (x, y) points as a line, with axes, ticks and a legend."""
    width, height = size
    left, right, top, bottom = 64, 16, 36, 48
    canvas = Image.new("RGB", size, _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    draw.text((left, 10), title, fill=_INK, font=_font(15))
    points = [p for values in series.values() for p in values if math.isfinite(p[1])]
    if not points:
        draw.text((left, height // 2), "no data yet", fill=_INK, font=font)
        return canvas
    xs, ys = zip(*points, strict=True)
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    plot_w, plot_h = width - left - right, height - top - bottom

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * plot_w, top + (1 - (y - y0) / (y1 - y0)) * plot_h)

    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=_INK)
    for k in range(5):
        fy, fx = y0 + (y1 - y0) * k / 4, x0 + (x1 - x0) * k / 4
        _, py = at(x0, fy)
        draw.line([left - 4, py, left, py], fill=_INK)
        draw.text((4, py - 7), f"{fy:.3g}", fill=_INK, font=font)
        px, _ = at(fx, y0)
        draw.line([px, top + plot_h, px, top + plot_h + 4], fill=_INK)
        draw.text((px - 12, top + plot_h + 6), f"{fx:.4g}", fill=_INK, font=font)
    draw.text((left + plot_w // 2 - 20, height - 18), x_label, fill=_INK, font=font)
    for k, (name, values) in enumerate(series.items()):
        colour = _PALETTE[k % len(_PALETTE)]
        finite = [at(x, y) for x, y in values if math.isfinite(y)]
        if len(finite) > 1:
            draw.line(finite, fill=colour, width=2)
        elif finite:
            draw.ellipse([finite[0][0] - 2, finite[0][1] - 2, finite[0][0] + 2,
                          finite[0][1] + 2], fill=colour)
        lx = left + plot_w - 150
        ly = top + 6 + k * 16
        draw.line([lx, ly + 7, lx + 18, ly + 7], fill=colour, width=3)
        draw.text((lx + 24, ly), name, fill=_INK, font=font)
    return canvas
