"""Image grids and line plots: sizes, where the pixels go, and the preview command."""

import math

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

from t2i_fast.cli import main
from t2i_fast.pictures import image_grid, line_plot, to_uint8


def test_to_uint8_maps_the_range():
    images = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    assert to_uint8(images).tolist() == [[[[0, 128, 255]]]]
    assert to_uint8(torch.full((1, 3, 2, 2), 200, dtype=torch.uint8)).max() == 200


def test_image_grid_places_each_image():
    colours = torch.linspace(-1, 1, 6)
    images = colours.view(6, 1, 1, 1).expand(6, 3, 8, 8)
    grid = image_grid(images, rows=2, scale=2, gap=2, row_labels=["first row", "second"])
    pixels = np.asarray(grid)
    # Row 0, column 2 is image 2; its top-left pixel sits at (gap, gap + 2 * (16 + gap)).
    assert pixels[2 + 1, 2 + 2 * 18 + 1].tolist() == [to_uint8(images[2:3])[0, 0, 0, 0]] * 3
    assert grid.width == 3 * 18 + 2
    assert grid.height > 2 * 18, "room for the captions under each row"


def test_line_plot_draws_every_series():
    plot = line_plot({"a": [(i, math.sin(i)) for i in range(50)], "b": [(0, 1.0), (49, 2.0)]},
                     title="t", x_label="step")
    pixels = np.asarray(plot)
    blue, orange = np.array([31, 119, 180]), np.array([255, 127, 14])
    assert (pixels == blue).all(-1).sum() > 50 and (pixels == orange).all(-1).sum() > 50
    empty = np.asarray(line_plot({"a": []}, title="t", x_label="x"))
    assert not (empty == blue).all(-1).any()


def test_preview_command(random_dataset, tmp_path):
    out = tmp_path / "p.png"
    result = CliRunner().invoke(main, ["preview", str(random_dataset), "--out", str(out),
                                       "--rows", "3", "--views", "2"])
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.width == 3 * (17 * 2 + 2) + 2  # stored + 2 views, 17 px crops at scale 2
