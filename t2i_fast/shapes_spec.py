"""The built-in shapes dataset's vocabulary and geometry: what its captions may say, how each
word is drawn, and which part of an image every training crop keeps.

One definition for the three modules that must agree on it: the generator
(``t2i_fast.prepare.shapes``) draws images and captions from it, the attribute scorer
(``t2i_fast.eval.attributes``) reads colour, shape and size back against it, and the
disentangling study (``t2i_fast.eval.disentangle``) places positions in its visible window.
Changing a value changes the dataset every seed makes and what the scorers expect, together.
Plain Python, so that it imports without the data plane's native code.
"""

from __future__ import annotations

COLORS = ("red", "yellow", "green", "cyan", "blue", "purple")
# Hues (degrees), one per colour, spread so that no two colours are confused after jitter and
# JPEG; the scorer names a shape by the nearest one.
HUES = (0.0, 58.0, 120.0, 185.0, 230.0, 285.0)
SHAPES = ("circle", "square", "triangle", "cross")
# The class of a record is its first shape's colour and shape, colour-major.
CLASSES = tuple(f"{color} {shape}" for color in COLORS for shape in SHAPES)
SIZES = ("small", "medium", "large")
# Half the bounding box's side (pixels), one per size, at the REFERENCE_SIZE stored side.
RADII = (7.0, 12.0, 18.0)
# A drawn radius is RADII[size] times a factor in [1 - RADIUS_JITTER, 1 + RADIUS_JITTER]:
# small enough that the sizes stay apart whether an image is seen whole or cropped.
RADIUS_JITTER = 0.08
# Half the width of a cross's two bars, as a share of its radius.
CROSS_ARM = 0.38
# The stored image side that RADII are given at, and the side of the training crop taken from
# it (Reed's 64 from 76); other stored sides scale both.
REFERENCE_SIZE = 76
TRAINING_CROP = 64
# Style: no caption names a background (or a position), so a generator takes them from noise.
BACKGROUNDS = ("light grey", "dark grey", "beige", "slate", "vertical gradient",
               "horizontal gradient", "noise", "stripes")

# The words a caption uses for each size, drawn at random.
SIZE_WORDS = {
    "small": ("small", "tiny", "little"),
    "medium": ("medium", "medium-sized", "mid-sized"),
    "large": ("large", "big", "huge"),
}
# Caption templates of one-shape images: every one names the size, the colour and the shape.
ONE_SHAPE_TEMPLATES = (
    "a {size} {color} {shape}",
    "there is a {size} {color} {shape} in the picture",
    "this image shows a {size} {color} {shape}",
    "a picture of a {size} {color} {shape}",
    "the image contains a {size} {color} {shape}",
    "a {color} {shape} that is {size}",
    "a {size} {shape} colored {color}",
    "one {size} {color} {shape}",
    "a {size} {shape} in {color}",
    "here we see a {size} {color} {shape}",
    "a single {size} {color} {shape}",
    "an image with a {size} {color} {shape}",
    "this is a {size} {color} {shape}",
    "a {shape} that is {color} and {size}",
    "the picture shows one {size} {color} {shape}",
    "a {size} {color} {shape} is drawn here",
    "{size} {color} {shape}",
)
# Caption templates of two-shape images: {a} and {b} are each "{size} {color} {shape}".
TWO_SHAPE_TEMPLATES = (
    "a {a} and a {b}",
    "there is a {a} and a {b} in the picture",
    "this image shows a {a} and a {b}",
    "two shapes: a {a} and a {b}",
    "a {a} together with a {b}",
    "a {a} with a {b}",
    "the picture contains a {a} and a {b}",
    "a {a} plus a {b}",
    "two objects, a {a} and a {b}",
    "here we see a {a} and a {b}",
    "an image with a {a} and a {b}",
    "this is a {a} and a {b}",
    "one {a} and one {b}",
    "a {a} as well as a {b}",
)


def one_shape_captions(color: str, shape: str, size: str) -> list[str]:
    """Every one-shape caption template filled with this shape, its size words taken in
    turn: the captions a record of it could have, before case and punctuation vary."""
    words = SIZE_WORDS[size]
    return [template.format(size=words[k % len(words)], color=color, shape=shape)
            for k, template in enumerate(ONE_SHAPE_TEMPLATES)]


def training_crop(image_size: int) -> int:
    """The side of the training crop of a stored ``image_size`` image: TRAINING_CROP at
    REFERENCE_SIZE, scaled."""
    return round(image_size * TRAINING_CROP / REFERENCE_SIZE)


def visible_window(image_size: int) -> tuple[int, int]:
    """[low, high) on both axes of a stored ``image_size`` image: the pixels that every
    training crop keeps, whatever its offset. The generator keeps shapes inside it."""
    crop = training_crop(image_size)
    return image_size - crop, crop
