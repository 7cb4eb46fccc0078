"""``t2i-fast sample`` and ``t2i-fast interpolate`` on a briefly trained run."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tiny_run
from PIL import Image

from t2i_fast.cli import main
from t2i_fast.prepare.shapes import make_shapes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    make_shapes(out=root / "shapes.lmdb", n=16)
    return tiny_run(root / "shapes.lmdb", root / "run")


def invoke(*args):
    return CliRunner().invoke(main, [*map(str, args)])


def test_sample_grid_has_a_row_per_caption(run, tmp_path):
    out = tmp_path / "grid.png"
    result = invoke("sample", "--run", run, "--text", "a large red circle", "--text",
                    "a tiny blue cross", "--n", 3, "--out", out)
    assert result.exit_code == 0, result.output
    with Image.open(out) as grid:
        assert grid.width == 3 * (32 * 2 + 2) + 2 and grid.height > 2 * (32 * 2 + 2)


def test_sample_folder_with_index_in_batches(run, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("a large red circle\r\n\r\na small green square\n")
    out = tmp_path / "images"
    result = invoke("sample", "--run", run, "--captions", captions, "--n", 3, "--seed", 5,
                    "--batch-size", 4, "--out", out)
    assert result.exit_code == 0, result.output
    index = json.loads((out / "index.json").read_text())
    assert [row["caption"] for row in index] == ["a large red circle"] * 3 + \
        ["a small green square"] * 3
    assert all((out / row["file"]).is_file() and row["seed"] == 5 for row in index)
    # Image j of every caption shares noise j, whatever the batching.
    again = tmp_path / "again"
    invoke("sample", "--run", run, "--captions", captions, "--n", 3, "--seed", 5,
           "--batch-size", 64, "--out", again)
    for row in index:
        a = np.asarray(Image.open(out / row["file"]))
        b = np.asarray(Image.open(again / row["file"]))
        assert np.abs(a.astype(int) - b).max() <= 1


def test_interpolations(run, tmp_path):
    sentence = tmp_path / "sentence.png"
    result = invoke("interpolate", "--run", run, "--text", "a red circle", "--text",
                    "a blue square", "--steps", 5, "--rows", 2, "--out", sentence)
    assert result.exit_code == 0, result.output
    with Image.open(sentence) as grid:
        pixels = np.asarray(grid)
        assert grid.width == 5 * (32 * 2 + 2) + 2
    noise = tmp_path / "noise.png"
    assert invoke("interpolate", "--run", run, "--text", "a red circle", "--steps", 4,
                  "--out", noise).exit_code == 0
    assert pixels.std() > 0


def test_sample_errors(run, tmp_path):
    assert invoke("sample", "--run", run, "--out", tmp_path / "x.png").exit_code == 2
    result = invoke("sample", "--run", tmp_path, "--text", "a", "--out", tmp_path / "x.png")
    assert result.exit_code == 1 and "no checkpoint" in result.output
    three = invoke("interpolate", "--run", run, "--text", "a", "--text", "b", "--text", "c")
    assert three.exit_code == 1 and "one caption" in three.output
