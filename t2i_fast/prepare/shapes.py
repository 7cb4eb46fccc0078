"""The built-in synthetic dataset: one or two coloured shapes on a grey-ish background, with
templated captions that name each shape's colour, shape and size and nothing else.

Background and position are "style": no caption mentions them, so a conditional generator has
to take them from its noise input. Every image is a pure function of (seed, index) and the
held-out colour-shape combinations (none by default), so a dataset is reproducible and its
first k images do not depend on how many were asked for.

The words, templates, hues, radii and visible window are ``t2i_fast.shapes_spec``, which the
scorers read too; this module draws images and captions from them.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from t2i_fast.data.alphabet import DEFAULT_DOC_LENGTH
from t2i_fast.data.writer import DatasetWriter
from t2i_fast.errors import DataError
from t2i_fast.prepare import progress
from t2i_fast.shapes_spec import (
    BACKGROUNDS,
    CLASSES,
    COLORS,
    CROSS_ARM,
    HUES,
    ONE_SHAPE_TEMPLATES,
    RADII,
    RADIUS_JITTER,
    REFERENCE_SIZE,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    TWO_SHAPE_TEMPLATES,
    visible_window,
)

CAPTIONS_PER_IMAGE = 10
_TWO_SHAPES = 0.6  # chance of a second shape where the first leaves room for one
_CANDIDATES = 32  # position pairs tried at once for two shapes before falling back to one


def make_shapes(*, out: str | Path, n: int = 10000, seed: int = 0, image_size: int = 76,
                encoding: str = "raw", doc_length: int = DEFAULT_DOC_LENGTH,
                overwrite: bool = False, holdout_pairs: Iterable[str] = ()) -> int:
    """Write ``n`` images; returns ``n``. No record draws a colour-shape pair named in
    ``holdout_pairs`` ("red circle", ...), as first or second shape: the meta lists them (as
    ``holdout``) for zero-shot evaluation."""
    if n < 1 or seed < 0:
        raise DataError(f"need n >= 1 and seed >= 0, got n={n}, seed={seed}")
    held = pair_classes(holdout_pairs)
    extra = {"seed": seed, **({"holdout": [CLASSES[k] for k in held]} if held else {})}
    writer = DatasetWriter(out, image_size=image_size, classes=list(CLASSES), source="shapes",
                           split="all", encoding=encoding, doc_length=doc_length,
                           overwrite=overwrite, extra_meta=extra)
    canvas = Canvas(image_size, holdout=held)
    with writer, progress(n, "shapes") as bar:
        for index in range(n):
            image, captions, class_id, attributes = canvas.sample(seed, index)
            writer.add(image, captions, class_id=class_id, name=f"shape_{index:06d}",
                       attributes=attributes)
            bar.update(1)
    return n


def pair_classes(pairs: Iterable[str]) -> list[int]:
    """Class ids of colour-shape pairs held out ("red circle"; case and spacing free), sorted;
    at least two classes must stay drawable, since a second shape differs from the first."""
    held = set()
    for pair in pairs:
        name = " ".join(pair.lower().split())
        if name not in CLASSES:
            raise DataError(f"held-out pair {pair!r} is not a colour and a shape (colours: "
                            f"{', '.join(COLORS)}; shapes: {', '.join(SHAPES)})")
        held.add(CLASSES.index(name))
    if len(CLASSES) - len(held) < 2:
        raise DataError(f"at most {len(CLASSES) - 2} of the {len(CLASSES)} combinations of "
                        "a colour and a shape can be held out")
    return sorted(held)


class Canvas:
    """Draws samples at one image size; holds the pixel grid shared by all of them."""

    def __init__(self, image_size: int, *, holdout: Iterable[int] = ()):
        self.size = image_size
        # The class ids a shape may have. With none held out, draws index the full range, so
        # every image is what it was before held-out combinations existed.
        held = set(holdout)
        self.kinds = [k for k in range(len(CLASSES)) if k not in held]
        self.scale = image_size / REFERENCE_SIZE
        # Shapes stay inside the part of the image that every training crop keeps.
        self.low, self.high = visible_window(image_size)
        self.pad = max(1.0, self.scale)  # room for the anti-aliased edge
        # Cap the radius so that even a large shape fits the window at tiny image sizes.
        self.max_radius = (self.high - self.low) / 2 - self.pad
        # Sizes a second, no larger shape can have beside each first size: those that leave
        # room for both when pushed to opposite sides, 2·(r1 + r2) + 3·pad <= window.
        self.companions = [
            [b for b in range(a + 1) if 2 * (RADII[a] + RADII[b]) * self.scale + 3 * self.pad
             <= self.high - self.low]
            for a in range(len(SIZES))
        ]
        centres = np.arange(image_size, dtype=np.float32) + 0.5
        self.ys, self.xs = centres[:, None], centres[None, :]

    def sample(self, seed: int, index: int) -> tuple[np.ndarray, list[str], int, dict]:
        """(uint8 [S, S, 3] image, captions, class id, ground-truth attributes)."""
        rng = np.random.default_rng([seed, index])
        shapes = self._layout(rng)
        background_id = int(rng.integers(len(BACKGROUNDS)))
        canvas = self._background(rng, background_id)
        for shape in shapes:
            alpha = np.clip(0.5 - self._distance(shape), 0.0, 1.0)[..., None]
            canvas += alpha * (shape["rgb"] - canvas)
        image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
        attributes = {
            "shapes": [{key: shape[key] for key in ("color", "shape", "size", "cx", "cy",
                                                    "radius")} for shape in shapes],
            "background": BACKGROUNDS[background_id],
            "background_id": background_id,
            "position": [shapes[0]["cx"], shapes[0]["cy"]],
        }
        first = shapes[0]
        class_id = COLORS.index(first["color"]) * len(SHAPES) + SHAPES.index(first["shape"])
        return image, draw_captions(rng, shapes), class_id, attributes

    def _layout(self, rng: np.random.Generator) -> list[dict]:
        count = len(self.kinds)
        first = rng.integers(count)
        # The second shape differs in colour or shape, so captions never name two equal shapes.
        kinds = [self.kinds[first], self.kinds[(first + rng.integers(1, count)) % count]]
        sizes = [int(rng.integers(len(SIZES)))]
        companions = self.companions[sizes[0]]
        if companions and rng.random() < _TWO_SHAPES:
            sizes.append(companions[rng.integers(len(companions))])
        jitter = (1 - RADIUS_JITTER, 1 + RADIUS_JITTER)
        radii = [min(RADII[s] * self.scale * rng.uniform(*jitter), self.max_radius)
                 for s in sizes]
        # Equal size classes only: the jitter keeps classes apart.
        radii.sort(reverse=True)
        centres = [self._centres(rng, r, _CANDIDATES) for r in radii]
        count = 1
        if len(sizes) == 2:
            apart = np.abs(centres[0] - centres[1]).max(axis=1) >= radii[0] + radii[1] + self.pad
            if apart.any():
                count = 2
                pick = int(np.argmax(apart))
                centres = [c[pick] for c in centres]
        if count == 1:
            centres = [centres[0][0]]
        shapes = []
        layout = zip(kinds[:count], sizes[:count], radii[:count], centres, strict=True)
        for kind, size, radius, (cx, cy) in layout:
            color = kind // len(SHAPES)
            hue = (HUES[color] + rng.uniform(-5, 5)) / 360 % 1.0
            rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.85, 1.0), rng.uniform(0.85, 1.0))
            shapes.append({
                "color": COLORS[color], "shape": SHAPES[kind % len(SHAPES)],
                "size": SIZES[size], "cx": round(float(cx), 2), "cy": round(float(cy), 2),
                "radius": round(float(radius), 2),
                "rgb": np.array(rgb, dtype=np.float32) * 255,
            })
        return shapes

    def _centres(self, rng: np.random.Generator, radius: float, count: int) -> np.ndarray:
        low, high = self.low + radius + self.pad, self.high - radius - self.pad
        return rng.uniform(low, max(low, high), size=(count, 2))

    def _distance(self, shape: dict) -> np.ndarray:
        """Signed distance (pixels, negative inside) from each pixel centre to the shape."""
        x = self.xs - shape["cx"]
        y = self.ys - shape["cy"]
        r = shape["radius"]
        kind = shape["shape"]
        if kind == "circle":
            return np.sqrt(x * x + y * y) - r
        if kind == "square":
            return _box(x, y, r, r)
        if kind == "triangle":
            # Apex up, base at the bottom of the bounding box; the largest of the three edge
            # distances is exact near the edges, which is all the anti-aliasing needs.
            return np.maximum(y - r, (np.abs(2 * x) - (y + r)) / 5**0.5)
        arm = CROSS_ARM * r
        return np.minimum(_box(x, y, r, arm), _box(x, y, arm, r))

    def _background(self, rng: np.random.Generator, kind: int) -> np.ndarray:
        """float32 [S, S, 3]; desaturated so that no background reads as a shape colour."""
        size = self.size
        shift = rng.uniform(-12, 12)
        if kind in (0, 1, 2, 3):
            base = ((215, 215, 215), (60, 60, 60), (225, 212, 185), (95, 105, 120))[kind]
            grey = np.full((size, size), shift, dtype=np.float32)
            return grey[..., None] + np.array(base, dtype=np.float32)
        if kind in (4, 5):
            ends = rng.uniform(170, 230), rng.uniform(40, 110)
            if rng.random() < 0.5:
                ends = ends[::-1]
            ramp = np.linspace(*ends, size, dtype=np.float32)
            grey = np.broadcast_to(ramp[:, None] if kind == 4 else ramp[None, :], (size, size))
        elif kind == 6:
            coarse = rng.uniform(60, 200, size=(5, 5)).astype(np.float32)
            grey = np.asarray(Image.fromarray(coarse).resize((size, size),
                                                              Image.Resampling.BICUBIC))
        else:
            angle = rng.choice((0.0, 0.25, 0.5, 0.75)) * np.pi
            period = rng.uniform(6, 12) * self.scale
            phase = (self.xs * np.cos(angle) + self.ys * np.sin(angle)) * (2 * np.pi / period)
            light, dark = rng.uniform(150, 210), rng.uniform(70, 130)
            grey = dark + (light - dark) * (0.5 + 0.5 * np.sin(phase + rng.uniform(0, 6.3)))
        return np.repeat(grey[..., None].astype(np.float32) + shift, 3, axis=2)


def _box(x: np.ndarray, y: np.ndarray, half_w: float, half_h: float) -> np.ndarray:
    qx, qy = np.abs(x) - half_w, np.abs(y) - half_h
    outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
    return outside + np.minimum(np.maximum(qx, qy), 0)


def _phrase(rng: np.random.Generator, shape: dict) -> dict:
    words = SIZE_WORDS[shape["size"]]
    return {"size": words[rng.integers(len(words))], "color": shape["color"],
            "shape": shape["shape"]}


def draw_captions(rng: np.random.Generator, shapes: list[dict]) -> list[str]:
    """CAPTIONS_PER_IMAGE captions of an image of ``shapes`` (one or two {"color", "shape",
    "size"}), each from a different template, drawn from ``rng``."""
    templates = ONE_SHAPE_TEMPLATES if len(shapes) == 1 else TWO_SHAPE_TEMPLATES
    captions = []
    for t in rng.choice(len(templates), CAPTIONS_PER_IMAGE, replace=False):
        if len(shapes) == 1:
            text = templates[t].format(**_phrase(rng, shapes[0]))
        else:
            a, b = ("{size} {color} {shape}".format(**_phrase(rng, s)) for s in shapes)
            if rng.random() < 0.5:
                a, b = b, a
            text = templates[t].format(a=a, b=b)
        # Mixed case and punctuation, as people write; the encoder lower-cases anyway.
        if rng.random() < 0.3:
            text = text[0].upper() + text[1:]
        if rng.random() < 0.3:
            text += "."
        captions.append(text)
    return captions
