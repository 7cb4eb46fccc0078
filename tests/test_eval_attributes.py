"""The attribute scorer for the shapes dataset: caption parsing, image analysis, the CLI."""

import itertools
import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import draw_shape, tiny_run, write_random_dataset

from t2i_fast.cli import main
from t2i_fast.data import Dataset
from t2i_fast.errors import DataError
from t2i_fast.eval import evaluate, evaluate_dataset, parse_caption, score_image
from t2i_fast.eval.attributes import _view
from t2i_fast.prepare.shapes import draw_captions, make_shapes
from t2i_fast.shapes_spec import (
    COLORS,
    ONE_SHAPE_TEMPLATES,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    TWO_SHAPE_TEMPLATES,
)


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("attributes") / "shapes.lmdb"
    make_shapes(out=path, n=300)
    return path


def _random_shape(rng):
    return {"color": str(rng.choice(COLORS)), "shape": str(rng.choice(SHAPES)),
            "size": str(rng.choice(SIZES))}


def _styled(text, upper, period):
    # The generator capitalises and punctuates some captions; the parse must not care.
    return (text[0].upper() + text[1:] if upper else text) + ("." if period else "")


def test_parse_recovers_every_one_shape_template_and_size_word():
    rng = np.random.default_rng(0)
    for template, size, upper, period in itertools.product(
            ONE_SHAPE_TEMPLATES, SIZES, (False, True), (False, True)):
        for word in SIZE_WORDS[size]:
            truth = {**_random_shape(rng), "size": size}
            text = _styled(template.format(**{**truth, "size": word}), upper, period)
            assert parse_caption(text) == [truth], text


def test_parse_keeps_caption_order_in_every_two_shape_template():
    rng = np.random.default_rng(1)
    for template, upper, period in itertools.product(
            TWO_SHAPE_TEMPLATES, (False, True), (False, True)):
        for _ in range(20):
            truth = [_random_shape(rng) for _ in range(2)]
            phrases = [f"{rng.choice(SIZE_WORDS[s['size']])} {s['color']} {s['shape']}"
                       for s in truth]
            text = _styled(template.format(a=phrases[0], b=phrases[1]), upper, period)
            assert parse_caption(text) == truth, text


def test_parse_reads_the_generators_own_captions():
    rng = np.random.default_rng(2)
    for count in (1, 2) * 300:
        shapes = [_random_shape(rng) for _ in range(count)]
        for text in draw_captions(rng, shapes):
            parsed = parse_caption(text)
            # Two-shape captions name the shapes in either order.
            assert parsed in (shapes, shapes[::-1]), text


def test_parse_special_cases():
    assert parse_caption("A circle that is purple and medium.") == [
        {"color": "purple", "shape": "circle", "size": "medium"}]
    assert parse_caption("a tiny red cross") == [
        {"color": "red", "shape": "cross", "size": "small"}]
    assert parse_caption("a square") == [{"color": None, "shape": "square", "size": None}]
    assert parse_caption("a bird with red wings") == []


def test_real_images_score_right_at_training_crops(shapes_data):
    scores = evaluate_dataset(shapes_data, crop=64)
    assert scores["n"] == 300
    for key in ("color_acc", "shape_acc", "size_acc"):
        assert scores[key] >= 0.99, scores


def test_real_images_score_right_at_32_pixels(shapes_data):
    scores = evaluate_dataset(shapes_data, crop=64, resize=32)
    for key in ("color_acc", "shape_acc", "size_acc"):
        assert scores[key] >= 0.97, scores


def test_mirrored_images_score_the_same(shapes_data):
    from t2i_fast.data import Dataset

    with Dataset(shapes_data) as ds:
        for index in range(60):
            for crop, resize in ((64, None), (None, 32)):
                image = _view(ds[index].image, crop, resize)
                assert score_image(image) == score_image(image[:, ::-1].copy())


def test_no_shape_scores_none_and_counts_as_wrong():
    rng = np.random.default_rng(3)
    grey = np.full((64, 64, 3), 128, dtype=np.uint8)
    assert score_image(grey) == {"color": None, "shape": None, "size": None}
    noise = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
             for size in (32, 64, 76, 128) for _ in range(5)]
    scored = [score_image(image) for image in noise]
    assert sum(s["color"] is None for s in scored) >= 0.8 * len(noise)
    target = {"color": "red", "shape": "circle", "size": "large"}
    assert evaluate([grey], [target]) == {"color_acc": 0.0, "shape_acc": 0.0, "size_acc": 0.0,
                                         "n": 1}


@pytest.mark.parametrize(("size", "shape", "radius", "rgb", "expected"), [
    (64, "circle", 18, (230, 20, 20), ("red", "large")),
    (32, "circle", 9, (230, 20, 20), ("red", "large")),
    (64, "square", 7, (30, 60, 240), ("blue", "small")),
    (64, "triangle", 12, (20, 220, 30), ("green", "medium")),
    (76, "cross", 12, (240, 230, 10), ("yellow", "medium")),
])
def test_hand_drawn_shapes(size, shape, radius, rgb, expected):
    color, size_class = expected
    assert score_image(draw_shape(size, shape, radius, rgb)) == {
        "color": color, "shape": shape, "size": size_class}


def test_two_shapes_report_the_larger():
    image = draw_shape(64, "square", 7, (30, 60, 240), centre=(14, 14))
    big = draw_shape(64, "circle", 12, (230, 20, 20), centre=(40, 40))
    image[big[..., 1] != 140] = big[big[..., 1] != 140]
    assert score_image(image) == {"color": "red", "shape": "circle", "size": "medium"}


def test_evaluate_dataset_needs_ground_truth(tmp_path):
    path = write_random_dataset(tmp_path / "random.lmdb", n=3, size=20)
    with pytest.raises(DataError, match="no ground-truth shapes"):
        evaluate_dataset(path, crop=None)


def test_cli_json_matches_the_library(shapes_data):
    result = CliRunner().invoke(main, ["eval", "attributes", "--data", str(shapes_data),
                                       "--real", "--n", "40", "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert set(scores) == {"color_acc", "shape_acc", "size_acc", "n"}
    assert scores == evaluate_dataset(shapes_data, n=40, crop=64)
    assert scores["n"] == 40


def test_cli_table(shapes_data):
    result = CliRunner().invoke(main, ["eval", "attributes", "--data", str(shapes_data),
                                       "--real", "--n", "10"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["attribute", "accuracy"]
    assert [line.split()[0] for line in lines[1:]] == ["color", "shape", "size", "images"]
    assert lines[-1].split() == ["images", "10"]


def test_cli_errors(tmp_path, shapes_data):
    missing = tmp_path / "nope.lmdb"
    result = CliRunner().invoke(main, ["eval", "attributes", "--data", str(missing), "--real"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {missing}: not a t2i-fast dataset (no data.mdb; make one with "
        "'t2i-fast prepare')"]
    result = CliRunner().invoke(main, ["eval", "attributes", "--data", str(shapes_data)])
    assert result.exit_code == 2
    assert "pass either --run RUN (generated images) or --data DATASET --real" in result.output


def test_generated_images_of_a_run(tmp_path, shapes_data):
    run = tiny_run(shapes_data, tmp_path / "run", max_steps=2)
    result = CliRunner().invoke(main, ["eval", "attributes", "--run", str(run), "--n", "12",
                                       "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert scores["n"] == 12 and set(scores) == {"color_acc", "shape_acc", "size_acc", "n"}
    # Two steps of training draw no recognisable shapes: the scorer must not be fooled.
    assert scores["shape_acc"] < 0.9
    every = CliRunner().invoke(main, ["eval", "attributes", "--run", str(run), "--n", "100000",
                                      "--json"])
    with Dataset(shapes_data) as ds:
        one_shape = sum(len(ds[i].attributes["shapes"]) == 1 for i in range(len(ds)))
    assert 0 < one_shape < len(ds) and json.loads(every.output)["n"] == one_shape
    missing = CliRunner().invoke(main, ["eval", "attributes", "--run", str(tmp_path)])
    assert missing.exit_code == 1 and "no checkpoint" in missing.output
