"""eval diversity: the spread and style coverage of images from one caption, against the real
images of that caption."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tiny_run, write_random_dataset

from t2i_fast.cli import main
from t2i_fast.data import Dataset
from t2i_fast.eval.attributes import parse_caption
from t2i_fast.eval.diversity import (
    evaluate_diversity,
    one_shape_records,
    position_cells,
    read_background,
    read_position,
    spread,
    view_cell,
    views,
)
from t2i_fast.prepare.shapes import make_shapes

SIZE = 32  # the small preset's side


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    path = tmp_path_factory.mktemp("diversity") / "shapes.lmdb"
    make_shapes(out=path, n=600)
    return path


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Other real images, drawn straight at the small preset's training view (38 stored
    pixels, a 32-pixel crop), with another seed: what a generator as varied as the data would
    make."""
    path = tmp_path_factory.mktemp("diversity_pool") / "pool.lmdb"
    make_shapes(out=path, n=2000, seed=1, image_size=38)
    return path


def _key(caption):
    (shape,) = parse_caption(caption)
    return shape["color"], shape["shape"], shape["size"]


def real_sampler(pool):
    groups = one_shape_records(pool)

    def sample(caption, n, seed):
        picks = groups[_key(caption)][:n]
        assert len(picks) == n, "the pool holds too few images of this caption"
        with Dataset(pool) as ds:
            return views([ds[i].image for i in picks], stored=38, size=SIZE)
    return sample


def constant_sampler(shapes):
    """One real image of the caption, the same for every noise."""
    groups = one_shape_records(shapes)

    def sample(caption, n, seed):
        with Dataset(shapes) as ds:
            image = views([ds[groups[_key(caption)][0]].image], stored=76, size=SIZE)
        return np.repeat(image, n, axis=0)
    return sample


@pytest.mark.parametrize("size", [64, 32])
def test_the_readers_read_real_images(shapes, size):
    """Background kind and position cell read from one-shape training views at the `reed`
    and `small` sides match the records' ground truth."""
    with Dataset(shapes) as ds:
        samples = [s for s in (ds[i] for i in range(300)) if len(s.attributes["shapes"]) == 1]
    images = views([s.image for s in samples], stored=76, size=size)
    truth = np.array([s.attributes["background_id"] for s in samples])
    read = np.array([read_background(image) for image in images])
    assert len(set(truth)) == 8 and np.mean(read == truth) >= 0.95
    cells = position_cells(np.array([s.attributes["position"] for s in samples]), low=12,
                           high=64)
    read = [view_cell(read_position(image), stored=76) for image in images]
    assert len(set(cells)) >= 6 and np.mean(np.array(read) == cells) >= 0.9


def test_position_cells_split_the_visible_window_in_thirds():
    # The 76-pixel shapes images keep pixels [12, 64) in every crop: cells 52 / 3 pixels wide.
    centres = [(13, 13), (30, 13), (47, 13), (13, 29), (13, 30), (63, 63), (5, 70)]
    assert position_cells(np.array(centres), low=12, high=64).tolist() == [0, 1, 2, 0, 3, 8, 6]


def test_read_position_of_nothing_is_none():
    assert read_position(np.full((32, 32, 3), 128, dtype=np.uint8)) is None
    # Saturated speckle is mostly no shape: a generator making noise covers few positions.
    found = [read_position(np.random.default_rng(seed).integers(0, 256, (32, 32, 3),
                                                                dtype=np.uint8))
             for seed in range(40)]
    assert sum(centre is not None for centre in found) <= 8
    assert view_cell(None, stored=76) is None


def test_spread_is_the_mean_pairwise_rms_distance():
    black, white, grey = (np.full((1, 32, 32, 3), v, dtype=np.uint8) for v in (0, 255, 51))
    assert spread(np.concatenate([black, white])) == pytest.approx(1.0)
    # Pairs: black-white 1, black-grey 0.2, white-grey 0.8.
    assert spread(np.concatenate([black, white, grey])) == pytest.approx(2.0 / 3)
    assert spread(np.repeat(grey, 5, axis=0)) == 0.0
    # Half the image white: the distance is sqrt(1/2) whatever the resolution.
    half = black.copy()
    half[:, :, :16] = 255
    assert spread(np.concatenate([black, half])) == pytest.approx(0.5**0.5)


def test_real_images_against_real_images(shapes, pool):
    scores = evaluate_diversity(sampler=real_sampler(pool), dataset=shapes, size=SIZE, n=4,
                                captions=12, seed=3)
    assert scores["n_captions"] == 12 == len(scores["per_caption"])
    assert 0.8 <= scores["ratio"] <= 1.25
    for kind in ("backgrounds", "positions"):
        assert scores[kind] == pytest.approx(scores[f"real_{kind}"], abs=0.1)
    # Four images: about 3.5 of 8 backgrounds; a cell or two (a large shape stays in the
    # middle one), more than a constant's one.
    assert scores["backgrounds"] >= 0.35 and scores["positions"] >= 1 / 9 + 0.02
    for row in scores["per_caption"].values():
        assert row["ratio"] == pytest.approx(row["spread"] / row["real_spread"])


def test_a_generator_that_ignores_its_noise(shapes):
    scores = evaluate_diversity(sampler=constant_sampler(shapes), dataset=shapes, size=SIZE,
                                n=4, captions=12, seed=3)
    assert scores["ratio"] == 0.0 and scores["spread"] == 0.0 and scores["real_spread"] > 0.05
    for row in scores["per_caption"].values():
        assert row["backgrounds"] == 1 / 8 and row["positions"] <= 1 / 9
    assert scores["real_backgrounds"] >= 0.35 and scores["real_positions"] >= 1 / 9 + 0.02


def test_every_caption_with_two_real_images_is_scored(shapes):
    groups = one_shape_records(shapes)
    scores = evaluate_diversity(sampler=constant_sampler(shapes), dataset=shapes, size=SIZE,
                                n=3)
    expected = {key: min(len(found), 3) for key, found in groups.items() if len(found) >= 2}
    assert {_key(c): row["n"] for c, row in scores["per_caption"].items()} == expected
    assert scores["n_images"] == sum(expected.values())


def _invoke(*args):
    return CliRunner().invoke(main, [*map(str, args)])


def test_cli(shapes, tmp_path):
    run = tiny_run(shapes, tmp_path / "run")
    args = ("eval", "diversity", "--run", run, "--n", 3, "--captions", 4, "--json")
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert scores["n_captions"] == 4 and scores["n_images"] == 12
    assert scores["ratio"] >= 0 and 0 < scores["real_backgrounds"] <= 1
    assert json.loads(_invoke(*args).output) == scores  # the seed fixes everything
    table = _invoke(*args[:-1]).output.splitlines()
    assert table[0].split()[:4] == ["caption", "ratio", "backgrounds", "positions"]
    assert [line.split()[0] for line in table[-2:]] == ["overall", "images"]
    assert len(table) == 1 + 4 + 2

    random = write_random_dataset(tmp_path / "random.lmdb", n=4, size=20)
    result = _invoke("eval", "diversity", "--run", run, "--data", random)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "no shapes, background or position" in lines[0], result.output
