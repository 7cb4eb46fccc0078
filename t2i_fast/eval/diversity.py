"""Diversity on the shapes dataset: do images generated from one caption vary with the noise as
much as the real images of that caption do?

The captions never name a background or a position, so the real images of one caption (one
colour, shape and size) vary in both, and a generator that uses its noise varies them too.
For each one-shape caption (colour, shape, size; the first template of
``shapes_spec.ONE_SHAPE_TEMPLATES``, fixed, so that only the noise changes), ``n`` images from
``n`` noise draws are set against ``n`` real one-shape records of that colour, shape and size:

- **spread**: the mean distance over all pairs of images, RMS over pixels and channels in
  [0, 1], with every image seen as the generator learnt it (the real one's training crop,
  area-resized to the model's side) and then area-averaged to ``SPREAD_SIDE`` pixels. At that
  side the background's kind and brightness and where the shape sits (the style the noise
  must supply) decide the distance, while detail a generator blurs does not count as lack of
  variety. ``ratio`` is the generated spread over the real one: 0 for a generator that
  ignores its noise, about 1 for one that varies as the data does.
- **coverage**: the share of the 8 backgrounds (``shapes_spec.BACKGROUNDS``) and of the 9
  position cells (3×3 over the visible window, where the generator places shapes) that the
  ``n`` images show. The real images' kinds and positions are their records' ground truth;
  the generated ones' are read by a fixed image analysis (``read_background``,
  ``read_position``) that reads the real images themselves mostly right (the tests hold it to
  that at 64 and 32 pixels). Coverage depends on ``n`` and, for positions, on the size: a
  large shape's centre has little room to move. So the real images' coverage at the same
  ``n`` is reported beside it as the reference.

Overall: the ratio of the mean spreads, and coverage averaged over captions.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from t2i_fast.data.dataset import Dataset
from t2i_fast.errors import DataError, T2IError
from t2i_fast.eval.attributes import MIN_CHROMA, components, score_image
from t2i_fast.shapes_spec import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    SIZES,
    one_shape_captions,
    training_crop,
    visible_window,
)

SPREAD_SIDE = 16
# What the generator is asked for: (caption, n, seed) → uint8 [n, S, S, 3].
Sampler = Callable[[str, int, int], np.ndarray]

# Backgrounds as drawn (prepare/shapes.py): four flat colours, two linear ramps, smooth noise
# (a 5×5 grid, bicubic) and sine stripes of a period of 6-12 stored pixels. The readings
# below tell them apart by the background pixels' grey level and colour cast, how well a plane
# fits them, and whether they alternate within half a period.
_FLAT = (0, 1, 2, 3)
_GREY_SPLIT = 135.0  # between dark grey (60 ± 12) / slate (105 ± 12) and light grey / beige
_CAST = 8.0  # chroma of beige (|R - B| = 40) and slate (25), against grey's 0
_FLAT_STD = 5.0  # grey levels vary less than this over a flat background
_PLANE_FIT = 0.85  # share of the variance a plane explains in a ramp
_STRIPE_CORRELATION = -0.25  # stripes anticorrelate at half their period; smooth noise never
_EDGE = 2  # pixels around a shape (at 64) left out of the background: its anti-aliased edge

POSITION_CELLS = 3  # per axis


def position_cells(positions: np.ndarray, *, low: float, high: float,
                   cells: int = POSITION_CELLS) -> np.ndarray:
    """Centres [N, 2] (x, y in stored pixels) → cell ids [N] of a cells × cells grid over the
    window [low, high) on both axes (row-major; centres outside go to the nearest cell)."""
    index = np.floor((np.asarray(positions, dtype=np.float64) - low) / (high - low) * cells)
    x, y = np.clip(index, 0, cells - 1).astype(np.int64).T
    return y * cells + x


def read_background(image: np.ndarray) -> int:
    """The kind (index into ``BACKGROUNDS``) of a uint8 [S, S, 3] training view's background,
    read from the pixels away from any saturated shape."""
    rgb = np.asarray(image, dtype=np.float32)
    side = rgb.shape[0]
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    background = ~_dilate(chroma >= MIN_CHROMA, max(1, round(_EDGE * side / 64)))
    if background.sum() < 0.1 * background.size:
        background = chroma < MIN_CHROMA  # a shape fills the view: its edge is all there is
    if not background.any():
        return 0
    grey = rgb.mean(axis=2)
    values = grey[background]
    ys, xs = np.nonzero(background)
    plane = np.stack([np.ones_like(xs), ys, xs], axis=1).astype(np.float64)
    coeffs, *_ = np.linalg.lstsq(plane, values, rcond=None)
    residual = np.zeros_like(grey)
    residual[background] = values - plane @ coeffs
    total = float(values.std())
    if total < _FLAT_STD:
        cast = (rgb[background] - values[:, None]).mean(axis=0)  # RGB less grey, [3]
        dark = float(values.mean()) < _GREY_SPLIT
        if np.linalg.norm(cast) < _CAST:
            return 1 if dark else 0
        return 3 if dark else 2  # slate's cast is blue, beige's yellow: brightness tells
    if 1 - residual[background].var() / max(total**2, 1e-6) > _PLANE_FIT:
        return 4 if abs(coeffs[1]) > abs(coeffs[2]) else 5
    half_period = max(1, round(6 * side / 64))
    if _min_correlation(residual, background, half_period) < _STRIPE_CORRELATION:
        return 7
    return 6


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    grown = mask.copy()
    for _ in range(steps):
        step = grown.copy()
        step[1:] |= grown[:-1]
        step[:-1] |= grown[1:]
        step[:, 1:] |= grown[:, :-1]
        step[:, :-1] |= grown[:, 1:]
        grown = step
    return grown


def _min_correlation(residual: np.ndarray, mask: np.ndarray, lags: int) -> float:
    """The lowest correlation of ``residual`` with itself shifted by 1..``lags`` pixels along
    rows, columns or either diagonal, over pixel pairs both in ``mask``."""
    lowest = 1.0
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        for lag in range(1, lags + 1):
            a, b = _shifted(residual, mask, dy * lag, dx * lag)
            if a.size < 8:
                continue
            a, b = a - a.mean(), b - b.mean()
            norm = np.sqrt((a * a).sum() * (b * b).sum())
            if norm > 0:
                lowest = min(lowest, float((a * b).sum() / norm))
    return lowest


def _shifted(values: np.ndarray, mask: np.ndarray, dy: int, dx: int):
    height, width = values.shape
    rows = slice(0, height - dy), slice(dy, height)
    cols = (slice(0, width - dx), slice(dx, width)) if dx >= 0 else \
        (slice(-dx, width), slice(0, width + dx))
    first, second = (rows[0], cols[0]), (rows[1], cols[1])
    both = mask[first] & mask[second]
    return values[first][both], values[second][both]


def read_position(image: np.ndarray) -> tuple[float, float] | None:
    """The centre (x, y) of the largest saturated shape of a uint8 [S, S, 3] view, as shares
    of its side; None where the attribute scorer finds no shape (nothing saturated, or
    scattered colour rather than one flat shape), so that generated garbage covers few
    positions (6 of 40 images of uniform random pixels still read as one)."""
    if score_image(image)["color"] is None:
        return None
    rgb = np.asarray(image, dtype=np.float32)
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    labels, count = components(chroma >= MIN_CHROMA)
    largest = int(np.argmax(np.bincount(labels.ravel(), minlength=count + 1)[1:])) + 1
    ys, xs = np.nonzero(labels == largest)
    side = rgb.shape[0]
    # The middle of its extent, as the generator places a shape: a triangle's centroid is
    # a third of its radius below that.
    return ((xs.min() + xs.max() + 1) / 2 / side, (ys.min() + ys.max() + 1) / 2 / side)


def view_cell(centre: tuple[float, float] | None, *, stored: int) -> int | None:
    """The position cell of a centre given as shares of the training view's side, for a
    dataset of ``stored``-pixel images."""
    if centre is None:
        return None
    crop = training_crop(stored)
    offset = (stored - crop) / 2  # the centred training crop
    low, high = visible_window(stored)
    x, y = (offset + share * crop for share in centre)
    return int(position_cells(np.array([[x, y]]), low=low, high=high)[0])


def spread(images: np.ndarray) -> float:
    """Mean distance over all pairs of uint8 [N, S, S, 3] images (N ≥ 2), each area-averaged
    to ``SPREAD_SIDE`` pixels: RMS over pixels and channels, in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    x = F.adaptive_avg_pool2d(x, SPREAD_SIDE).flatten(1)  # [N, 3 · side²]
    distances = torch.cdist(x.double(), x.double()) / np.sqrt(x.shape[1])  # [N, N]
    n = len(x)
    return float(distances.sum() / (n * (n - 1)))


def views(images: list[np.ndarray], *, stored: int, size: int) -> np.ndarray:
    """Stored uint8 images → their centred training crops area-resized to ``size``, as the
    trainer sees them: uint8 [N, size, size, 3]."""
    crop = training_crop(stored)
    top = (stored - crop) // 2
    x = torch.from_numpy(np.stack([im[top:top + crop, top:top + crop] for im in images]))
    x = x.permute(0, 3, 1, 2).float()  # [N, 3, crop, crop]
    if crop != size:
        x = F.interpolate(x, size=(size, size), mode="area")
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def one_shape_records(dataset: str | Path, *, limit: int | None = None) -> dict:
    """(colour, shape, size) → indices of the one-shape records that show it, in order, from
    the first ``limit`` records (all when None)."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    with Dataset(dataset) as ds:
        for index in range(len(ds) if limit is None else min(limit, len(ds))):
            record = ds.record(index)
            truth = record.attributes
            if "shapes" not in truth or "background_id" not in truth or "position" not in truth:
                raise DataError(f"{dataset}: record {index} has no shapes, background or "
                                "position (the diversity study needs a dataset from "
                                "'t2i-fast prepare shapes')")
            if len(truth["shapes"]) == 1:
                shape = truth["shapes"][0]
                groups.setdefault((shape["color"], shape["shape"], shape["size"]),
                                  []).append(index)
    return groups


def evaluate_diversity(*, sampler: Sampler, dataset: str | Path, size: int, n: int = 16,
                       captions: int | None = None, seed: int = 0,
                       records: int | None = None) -> dict:
    """Spread and coverage of ``n`` images a caption from ``sampler`` (at ``size`` pixels)
    against ``n`` real images of that caption, for every colour, shape and size with at least
    2 one-shape records among the first ``records`` (fewer than ``n`` records: that many a
    side), or ``captions`` of them drawn at random by ``seed``. Caption k's noise seed is
    ``seed + k``."""
    groups = one_shape_records(dataset, limit=records)
    cells = [key for key in ((c, s, z) for c in COLORS for s in SHAPES for z in SIZES)
             if len(groups.get(key, ())) >= 2]
    if not cells:
        raise T2IError(f"{dataset}: no colour, shape and size has 2 one-shape records (a "
                       "larger dataset, or raise --records)")
    if captions is not None and captions < len(cells):
        keep = np.random.default_rng(seed).choice(len(cells), captions, replace=False)
        cells = [cells[k] for k in sorted(keep)]
    rows = {}
    with Dataset(dataset) as ds:
        stored = min(ds.meta["image_size"])
        for k, (color, shape, size_word) in enumerate(cells):
            picks = groups[(color, shape, size_word)][:n]
            samples = [ds[i] for i in picks]
            real = views([s.image for s in samples], stored=stored, size=size)
            caption = one_shape_captions(color, shape, size_word)[0]
            fake = np.asarray(sampler(caption, len(picks), seed + k))
            if fake.shape != real.shape:
                raise T2IError(f"the generator made images of shape {fake.shape}, expected "
                               f"{real.shape}")
            low, high = visible_window(stored)
            truth_cells = position_cells(
                np.array([s.attributes["position"] for s in samples]), low=low, high=high)
            read_cells = {view_cell(read_position(im), stored=stored) for im in fake} - {None}
            rows[caption] = {
                "n": len(picks),
                "spread": spread(fake), "real_spread": spread(real),
                "backgrounds": len({read_background(im) for im in fake}) / len(BACKGROUNDS),
                "real_backgrounds": len({s.attributes["background_id"] for s in samples})
                / len(BACKGROUNDS),
                "positions": len(read_cells) / POSITION_CELLS**2,
                "real_positions": len(set(truth_cells.tolist())) / POSITION_CELLS**2,
            }
            rows[caption]["ratio"] = rows[caption]["spread"] / max(
                rows[caption]["real_spread"], 1e-12)
    overall = {key: float(np.mean([row[key] for row in rows.values()]))
               for key in ("spread", "real_spread", "backgrounds", "real_backgrounds",
                           "positions", "real_positions")}
    return {"ratio": overall["spread"] / max(overall["real_spread"], 1e-12), **overall,
            "n_captions": len(rows), "n_images": sum(row["n"] for row in rows.values()),
            "per_caption": rows}
