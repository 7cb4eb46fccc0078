"""Attribute scores for the shapes dataset: does an image show the colour, shape and size that
its caption names? A fixed image analysis, no learned model, so that scores mean the same for
every run and need no checkpoint.

The analysis measures a shape by its soft coverage (alpha) rather than by a thresholded mask:
the generator anti-aliases, and downscaling blurs, but both keep each shape's total alpha and
its centred moments of order 3 and 4 (an isotropic blur adds nothing to them), so area, skew
and four-fold symmetry survive at 32 pixels, where a mask's outline no longer does.
"""

from __future__ import annotations

import colorsys
import re
from collections.abc import Iterable
from itertools import pairwise, permutations
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from t2i_fast.data.dataset import Dataset, Sample
from t2i_fast.errors import DataError
from t2i_fast.generate import TrainedModel
from t2i_fast.shapes_spec import (
    COLORS,
    CROSS_ARM,
    HUES,
    RADII,
    RADIUS_JITTER,
    REFERENCE_SIZE,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    TRAINING_CROP,
    one_shape_captions,
)

ATTRIBUTES = ("color", "shape", "size")

_SIZE_OF_WORD = {word: size for size, words in SIZE_WORDS.items() for word in words}
_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")

# Foreground is what has more chroma (max - min channel) than any background: beige, the most
# coloured one, has 40; shapes have at least 0.85 * 0.85 * 255 = 184, so this is about half
# coverage on every background.
MIN_CHROMA = 96.0
# Components smaller than this share of the image are specks (noise, stripes' edges), not shapes.
_MIN_AREA = 0.003
# A shape is one flat colour: its core pixels point (in chroma) where their mean does, unlike
# noise's, whose colours scatter.
_MIN_AGREEMENT = 0.9
# Cores are what has this share of its blob's peak chroma; edges reach _EDGE pixels beyond.
_CORE, _EDGE = 0.7, 3
# Areas of each shape with a bounding box of side 2: turns alpha into the generator's radius.
# A cross is two 2 × 2·CROSS_ARM bars that share their middle square.
_UNIT_AREA = {"circle": np.pi, "square": 4.0, "triangle": 2.0,
              "cross": 2 * 2 * (2 * CROSS_ARM) - (2 * CROSS_ARM)**2}
# Only the apex-up triangle is lopsided (vertical skewness -0.57); the others have none.
_TRIANGLE_SKEW = -0.25
# Four-fold moment over area cubed: 0 for a circle, -1/60 for a square (mass in the corners),
# 0.022 for the generator's cross (mass along the axes); thresholds halfway.
_SQUARE_BELOW, _CROSS_ABOVE = -1 / 120, 0.011
# The generator jitters radii by up to RADIUS_JITTER around RADII (at REFERENCE_SIZE pixels);
# an image may be the whole record or its TRAINING_CROP crop at any resolution, so a radius
# over the image side spans [r (1 - jitter) / REFERENCE_SIZE, r (1 + jitter) / TRAINING_CROP].
# Each threshold is the geometric mean of the gap between neighbouring sizes.
_SIZE_LIMITS = tuple(np.sqrt(small * (1 + RADIUS_JITTER) / TRAINING_CROP
                             * large * (1 - RADIUS_JITTER) / REFERENCE_SIZE)
                     for small, large in pairwise(RADII))
# (pixels, their 4-neighbours) as index pairs: each pixel paired with the one above, below,
# left and right of it, without wrapping around the border.
_NEIGHBOURS = (
    (np.s_[1:], np.s_[:-1]), (np.s_[:-1], np.s_[1:]),
    (np.s_[:, 1:], np.s_[:, :-1]), (np.s_[:, :-1], np.s_[:, 1:]),
)


def parse_caption(text: str) -> list[dict]:
    """The shapes a shapes-dataset caption names, in caption order: {"color", "shape", "size"}
    each, None for an attribute the caption leaves out.

    A colour or size word belongs to the next shape word, except that one right after a shape
    fills that shape's missing attribute ("a circle that is purple and medium").
    """
    shapes: list[dict] = []
    pending: dict = {}
    for word in _WORD.findall(text.lower()):
        if word in SHAPES:
            shapes.append({"color": None, "size": None, **pending, "shape": word})
            pending = {}
            continue
        key, value = _attribute(word)
        if key is None:
            continue
        if shapes and not pending and shapes[-1][key] is None:
            shapes[-1][key] = value
        else:
            pending[key] = value
    return [{key: shape[key] for key in ATTRIBUTES} for shape in shapes]


def _attribute(word: str) -> tuple[str | None, str | None]:
    if word in COLORS:
        return "color", word
    if word in _SIZE_OF_WORD:
        return "size", _SIZE_OF_WORD[word]
    return None, None


def score_image(image: np.ndarray) -> dict:
    """{"color", "shape", "size"} of the largest saturated shape in a uint8 RGB [H, W, 3]
    image; all None when nothing saturated is large enough to be a shape."""
    shapes = find_shapes(image)
    return shapes[0] if shapes else dict.fromkeys(ATTRIBUTES)


def find_shapes(image: np.ndarray) -> list[dict]:
    """{"color", "shape", "size"} of every saturated shape in a uint8 RGB [H, W, 3] image,
    the largest first; empty when nothing saturated is large enough to be a shape."""
    rgb = np.asarray(image, dtype=np.float32)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {rgb.shape}")
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    foreground = chroma >= MIN_CHROMA
    labels, count = components(_cores(chroma, foreground))
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    keep = np.flatnonzero(areas[1:] >= _MIN_AREA * labels.size) + 1
    if keep.size == 0:
        return []
    labels[~np.isin(labels, keep)] = 0
    # Beige and slate backgrounds have a colour cast; every other background is grey. Either
    # way one chroma offset, taken where no shape is, describes the whole background.
    offset = (np.median(_chroma_vector(rgb[~foreground]), axis=0) if not foreground.all()
              else np.zeros(3, dtype=np.float32))
    owners = _grow(labels, _EDGE)
    shapes = [_measure(rgb, labels == label, owners == label, offset) for label in keep]
    # Stable: of equally large shapes, the first found stays first.
    shapes = sorted((shape for shape in shapes if shape is not None),
                    key=lambda shape: shape["radius"], reverse=True)
    side = np.sqrt(labels.size)
    return [{"color": shape["color"], "shape": shape["shape"],
             "size": SIZES[int(np.searchsorted(_SIZE_LIMITS, shape["radius"] / side))]}
            for shape in shapes]


def _cores(chroma: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """The well-covered middle of each foreground blob: at 32 pixels the gap between two
    shapes blurs into a bridge of partial coverage, which this cuts."""
    labels, count = components(foreground)
    peaks = np.zeros(count + 1, dtype=chroma.dtype)
    np.maximum.at(peaks, labels, chroma)
    return foreground & (chroma >= _CORE * peaks[labels])


def _grow(labels: np.ndarray, steps: int) -> np.ndarray:
    """Hands each unlabelled pixel within ``steps`` of a component to the nearest one, so that
    every shape gets its soft edge and no pixel counts twice."""
    for _ in range(steps):
        grown = labels.copy()
        for target, source in _NEIGHBOURS:
            free = grown[target] == 0
            grown[target][free] = labels[source][free]
        labels = grown
    return labels


def _chroma_vector(rgb: np.ndarray) -> np.ndarray:
    """RGB less its grey part: mixing with any grey leaves a colour's direction here alone."""
    return rgb - rgb.mean(axis=-1, keepdims=True)


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of ``mask``: labels 1..count (0 outside), by min-propagation."""
    height, width = mask.shape
    big = mask.size
    labels = np.where(mask, np.arange(big).reshape(height, width), big)
    while True:
        spread = labels.copy()
        for target, source in _NEIGHBOURS:
            np.minimum(spread[target], labels[source], out=spread[target])
        spread[~mask] = big
        if np.array_equal(spread, labels):
            break
        labels = spread
    roots, inverse = np.unique(labels, return_inverse=True)
    labels = inverse.reshape(height, width) + 1
    labels[~mask] = 0
    return labels, len(roots) - int(not mask.all())


def _measure(rgb: np.ndarray, core: np.ndarray, region: np.ndarray,
             offset: np.ndarray) -> dict | None:
    """Colour, shape and radius (pixels, the generator's convention) of one shape: ``core`` its
    well-covered pixels, ``region`` all pixels its edge may reach; None where the pixels do not
    look like one flat colour over a background (generated garbage)."""
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    rgb, core, region = rgb[box], core[box], region[box]
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    fullest = core & (chroma >= 0.8 * chroma[core].max())
    colour = _chroma_vector(rgb[fullest].mean(axis=0)) - offset
    vectors = _chroma_vector(rgb) - offset
    alpha = vectors @ colour / max(float(colour @ colour), 1e-6)
    if _agreement(vectors[core], colour) < _MIN_AGREEMENT:
        return None
    # Small shapes blurred to 32 pixels cover no pixel fully: the best covered one stands for
    # full coverage, else every alpha comes out too high and small shapes too large.
    alpha = np.where(region, np.clip(alpha / alpha[core].max(), 0.0, 1.0), 0.0)
    shape = _shape(alpha)
    return {"color": _colour(colour), "shape": shape,
            "radius": np.sqrt(alpha.sum() / _UNIT_AREA[shape])}


def _agreement(vectors: np.ndarray, colour: np.ndarray) -> float:
    """Mean cosine between each pixel's colour and the shape's."""
    norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(colour)
    return float(np.mean(vectors @ colour / np.maximum(norms, 1e-6)))


def _colour(vector: np.ndarray) -> str:
    # Hue ignores the grey part, so the chroma vector shifted to non-negative values has the
    # shape's own hue.
    red, green, blue = (vector - vector.min()) / max(float(np.ptp(vector)), 1e-6)
    hue = colorsys.rgb_to_hsv(red, green, blue)[0] * 360
    distance = [abs((hue - ref + 180) % 360 - 180) for ref in HUES]
    return COLORS[int(np.argmin(distance))]


def _shape(alpha: np.ndarray) -> str:
    ys, xs = np.indices(alpha.shape, dtype=np.float64)
    mass = alpha.sum()
    y = ys - (alpha * ys).sum() / mass
    x = xs - (alpha * xs).sum() / mass
    spread = max((alpha * y**2).sum() / mass, 1e-6)
    skew = (alpha * y**3).sum() / mass / spread**1.5
    if skew < _TRIANGLE_SKEW:
        return "triangle"
    fourfold = (alpha * (x**4 - 6 * x**2 * y**2 + y**4)).sum() / mass**3
    if fourfold < _SQUARE_BELOW:
        return "square"
    if fourfold > _CROSS_ABOVE:
        return "cross"
    return "circle"


def evaluate(images: Iterable[np.ndarray], targets: Iterable[dict]) -> dict:
    """Share of ``images`` whose colour, shape and size match ``targets`` (one {"color",
    "shape", "size"} each); an image where nothing is found matches nothing."""
    return _tally((find_shapes(image), target)
                  for image, target in zip(images, targets, strict=True))


def evaluate_dataset(path: str | Path, *, n: int | None = None,
                     crop: int | None = TRAINING_CROP,
                     resize: int | None = None) -> dict:
    """Scores of the first ``n`` records against their first shape, each seen through a centre
    crop of ``crop`` pixels (the training view; None for the whole image), then area-resized
    to ``resize`` pixels as the trainer resizes (None to keep); and, under ``two_shape_*``
    keys, how often both shapes of the two-shape records among them are found."""
    with Dataset(path) as ds:
        count = len(ds) if n is None else min(n, len(ds))
        # (shapes found, shapes drawn) of each record: small, unlike the images.
        read = [(find_shapes(_view(s.image, crop, resize)), _truth_shapes(path, s))
                for s in (ds[i] for i in range(count))]
    return {**_tally((found, truth[0]) for found, truth in read),
            **_tally_two_shapes((found, truth) for found, truth in read if len(truth) == 2)}


def evaluate_generated(model: TrainedModel, path: str | Path, *, n: int = 512, seed: int = 0,
                       batch_size: int = 64) -> dict:
    """Scores of images generated from the first caption of the first ``n`` one-shape
    records, each against that shape. The first caption of the first ``n`` two-shape records
    is scored apart, under ``two_shape_*`` keys: whether the image shows two shapes and both
    named ones (a caption naming two shapes does not fix which one an image draws larger, so
    they are not scored as one shape).

    Where the dataset holds colour-shape combinations out (``prepare shapes --holdout-pairs``), no
    record shows them, so up to ``n`` more images come from captions of those combinations
    (every one-shape template, every size), scored under ``heldout_*`` keys: zero-shot."""
    by_count: dict[int, list[Sample]] = {1: [], 2: []}
    with Dataset(path) as ds:
        holdout = ds.meta.get("holdout", [])
        for i in range(len(ds)):
            if all(len(kept) == n for kept in by_count.values()):
                break
            sample = ds[i]
            kept = by_count.get(len(_truth_shapes(path, sample)))
            if kept is not None and len(kept) < n:
                kept.append(sample)
    samples = by_count[1]
    targets = [_truth(path, s) for s in samples]
    captions = [s.captions[0] for s in samples]
    scores = evaluate(_generate(model, captions, seed=seed, batch_size=batch_size), targets)
    two = by_count[2]
    images = _generate(model, [s.captions[0] for s in two], seed=seed, batch_size=batch_size)
    scores.update(_tally_two_shapes((find_shapes(image), _truth_shapes(path, s))
                                    for image, s in zip(images, two, strict=True)))
    if holdout:
        targets, captions = _held_out_prompts(holdout, n)
        held = evaluate(_generate(model, captions, seed=seed, batch_size=batch_size), targets)
        scores.update({f"heldout_{key}": value for key, value in held.items()})
    return scores


def _generate(model: TrainedModel, captions: list[str], *, seed: int,
              batch_size: int) -> list[np.ndarray]:
    images: list[np.ndarray] = []
    for start in range(0, len(captions), batch_size):
        images.extend(model.draw(captions[start: start + batch_size], seed + start))
    return images


def _held_out_prompts(combos: list[str], n: int) -> tuple[list[dict], list[str]]:
    """(targets, captions) of the held-out combinations at every size, at most ``n``."""
    cells = []
    for combo in combos:
        color, shape = combo.split()
        for size in SIZES:
            cells.append(({"color": color, "shape": shape, "size": size},
                          one_shape_captions(color, shape, size)))
    # Template by template, so that any first n cover every combination and size alike.
    ordered = [(target, texts[t]) for t in range(len(cells[0][1])) for target, texts in cells]
    targets, captions = zip(*ordered[:n], strict=True)
    return list(targets), list(captions)


def _tally(pairs: Iterable[tuple[list[dict], dict]]) -> dict:
    """Accuracy of the largest shape found in each image (``find_shapes``) against its
    target."""
    hits = dict.fromkeys(ATTRIBUTES, 0)
    count = 0
    for found, target in pairs:
        scored = found[0] if found else dict.fromkeys(ATTRIBUTES)
        for key in ATTRIBUTES:
            hits[key] += scored[key] is not None and scored[key] == target[key]
        count += 1
    return {**{f"{key}_acc": hits[key] / max(count, 1) for key in ATTRIBUTES}, "n": count}


def _tally_two_shapes(pairs: Iterable[tuple[list[dict], list[dict]]]) -> dict:
    """Of images each meant to show two shapes, given the shapes found in each and the two
    named: the share where two or more shapes are found (``two_shape_drawn``), where both named
    colours are (``two_shape_colors``), and where both named colour-shape pairs are
    (``two_shape_both``), each named shape on a found shape of its own; None without images."""
    hits = {"drawn": 0, "colors": 0, "both": 0}
    count = 0
    for found, named in pairs:
        hits["drawn"] += len(found) >= 2
        hits["colors"] += _each_found(found, named, ("color",))
        hits["both"] += _each_found(found, named, ("color", "shape"))
        count += 1
    return {**{f"two_shape_{key}": value / count if count else None
               for key, value in hits.items()}, "two_shape_n": count}


def _each_found(found: list[dict], named: list[dict], keys: tuple[str, ...]) -> bool:
    """Whether each named shape matches a different found shape on ``keys``."""
    def same(a: dict, b: dict) -> bool:
        return all(a[key] == b[key] for key in keys)
    return any(all(same(found[k], shape) for k, shape in zip(order, named, strict=True))
               for order in permutations(range(len(found)), len(named)))


def _truth_shapes(path: str | Path, sample: Sample) -> list[dict]:
    shapes = sample.attributes.get("shapes")
    if not shapes:
        raise DataError(f"{path}: record '{sample.key}' has no ground-truth shapes (attribute "
                        "scores need a dataset from 't2i-fast prepare shapes')")
    return shapes


def _truth(path: str | Path, sample: Sample) -> dict:
    return _truth_shapes(path, sample)[0]


def _view(image: np.ndarray, crop: int | None, resize: int | None) -> np.ndarray:
    if crop is not None:
        height, width = image.shape[:2]
        if not 0 < crop <= min(height, width):
            raise DataError(f"crop {crop} does not fit a {height}x{width} image")
        top, left = (height - crop) // 2, (width - crop) // 2
        image = image[top:top + crop, left:left + crop]
    if resize is not None and resize != image.shape[0]:
        pixels = torch.from_numpy(image.copy()).permute(2, 0, 1).float()
        pixels = F.adaptive_avg_pool2d(pixels, resize)  # [3, resize, resize], the trainer's
        image = pixels.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return image
