"""The shapes dataset's spec against the code it describes: the loader's training crops and
the attribute scorer's colour names."""

import colorsys

import numpy as np
import pytest
from conftest import draw_shape

from t2i_fast.data.loader import default_size
from t2i_fast.eval import score_image
from t2i_fast.shapes_spec import COLORS, HUES, SHAPES, training_crop, visible_window


def test_visible_window_is_what_every_training_crop_keeps():
    for stored in range(8, 300):
        crop = default_size(stored)
        assert training_crop(stored) == crop, stored
        # The pixels common to the loader's crops at every offset 0 .. stored - crop.
        kept = set(range(stored))
        for offset in range(stored - crop + 1):
            kept &= set(range(offset, offset + crop))
        low, high = visible_window(stored)
        assert kept == set(range(low, high)), stored


@pytest.mark.parametrize("color", COLORS)
def test_the_scorer_names_every_colour_the_generator_draws(color):
    # The generator's extremes: hue ±5 degrees, saturation and value in [0.85, 1].
    hue = HUES[COLORS.index(color)]
    for shift, saturation, value, shape in zip(
            (-5, 0, 5, -5, 5), (0.85, 1.0, 0.85, 1.0, 1.0), (0.85, 0.85, 1.0, 1.0, 0.9),
            (*SHAPES, SHAPES[0]), strict=True):
        rgb = np.array(colorsys.hsv_to_rgb((hue + shift) / 360 % 1.0, saturation, value)) * 255
        image = draw_shape(64, shape, 12, np.rint(rgb))
        assert score_image(image)["color"] == color, (shift, saturation, value, shape)
