"""Zero-shot colour-shape combinations: a shapes dataset that never shows some combinations,
and attribute scores of generated images of them, apart from the seen ones."""

import colorsys
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import draw_shape, tiny_run

from t2i_fast.cli import main
from t2i_fast.data import Dataset
from t2i_fast.errors import DataError
from t2i_fast.eval import parse_caption
from t2i_fast.eval.attributes import _held_out_prompts, evaluate_generated
from t2i_fast.generate import TrainedModel
from t2i_fast.prepare.shapes import Canvas, make_shapes
from t2i_fast.shapes_spec import CLASSES, COLORS, HUES, SIZES

HOLDOUT = ["blue square", "Red  Circle"]  # any order, case and spacing


@pytest.fixture(scope="module")
def held_out_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("zero_shot") / "shapes.lmdb"
    make_shapes(out=path, n=400, seed=5, holdout_pairs=HOLDOUT)
    return path


def test_no_record_shows_a_held_out_combination(held_out_data):
    with Dataset(held_out_data) as ds:
        assert ds.meta["holdout"] == ["red circle", "blue square"]  # class order
        shown = {f"{s['color']} {s['shape']}" for i in range(len(ds))
                 for s in ds[i].attributes["shapes"]}
        counts = ds.meta["class_counts"]
    assert not shown & {"red circle", "blue square"}
    assert shown == set(CLASSES) - {"red circle", "blue square"}, "the rest all still occur"
    assert counts[CLASSES.index("red circle")] == counts[CLASSES.index("blue square")] == 0


def test_held_out_datasets_are_reproducible_and_the_default_is_untouched(held_out_data,
                                                                          tmp_path):
    again = tmp_path / "again.lmdb"
    make_shapes(out=again, n=20, seed=5, holdout_pairs=["red circle", "blue square"])
    with Dataset(held_out_data) as a, Dataset(again) as b:
        for i in range(20):
            assert np.array_equal(a[i].image, b[i].image) and a[i].captions == b[i].captions
    plain = tmp_path / "plain.lmdb"
    make_shapes(out=plain, n=20, seed=5)
    canvas = Canvas(76)
    with Dataset(plain) as ds:
        assert "holdout" not in ds.meta
        for i in range(20):
            image, captions, _, _ = canvas.sample(5, i)
            assert np.array_equal(ds[i].image, image) and ds[i].captions == captions


@pytest.mark.parametrize(("holdout", "message"), [
    (["red circl"], "'red circl' is not a colour and a shape"),
    (["circle red"], "'circle red' is not a colour and a shape"),
    (CLASSES[:23], "at most 22 of the 24 combinations"),
])
def test_bad_holdouts_fail_before_writing(tmp_path, holdout, message):
    with pytest.raises(DataError, match=message):
        make_shapes(out=tmp_path / "bad.lmdb", n=5, holdout_pairs=holdout)
    assert not list(tmp_path.iterdir())


def test_cli_holdout(tmp_path):
    out = tmp_path / "cli.lmdb"
    result = CliRunner().invoke(main, ["prepare", "shapes", "--out", str(out), "--n", "30",
                                       "--holdout-pairs", "green cross, yellow triangle"])
    assert result.exit_code == 0, result.output
    with Dataset(out) as ds:
        assert ds.meta["holdout"] == ["yellow triangle", "green cross"]
    bad = CliRunner().invoke(main, ["prepare", "shapes", "--out", str(tmp_path / "b.lmdb"),
                                    "--holdout-pairs", "red circle,pink star"])
    assert bad.exit_code == 1 and "'pink star' is not a colour and a shape" in bad.output


def test_held_out_prompts_name_their_targets_and_cover_every_size():
    targets, captions = _held_out_prompts(["red circle", "blue square"], 1000)
    assert len(captions) == 2 * len(SIZES) * 17  # every one-shape template
    for target, caption in zip(targets, captions, strict=True):
        assert parse_caption(caption) == [target], caption
    first = _held_out_prompts(["red circle", "blue square"], 6)[0]
    assert {(t["color"], t["shape"], t["size"]) for t in first} == {
        (c, s, z) for c, s in (("red", "circle"), ("blue", "square")) for z in SIZES}


class DrawingModel:
    """Stands in for a trained run: draws what each caption names, hard-edged on grey at 64
    pixels, but with ``swap`` turning named colours into others (a generator that has only
    learnt the combinations it saw)."""

    def __init__(self, swap=None):
        self.swap = swap or {}
        self.captions = []

    def embed(self, captions):
        start = len(self.captions)
        self.captions += captions
        return torch.arange(start, start + len(captions))

    def noise(self, n, seed):
        return torch.zeros(n, 1)

    draw = TrainedModel.draw  # the evaluation draws as a trained run does

    def generate(self, text, z):
        return torch.stack([self._draw(parse_caption(self.captions[i])[0]) for i in text])

    def _draw(self, shape):
        color = self.swap.get(f"{shape['color']} {shape['shape']}", shape["color"])
        radius = {"small": 7, "medium": 12, "large": 18}[shape["size"]]
        rgb = colorsys.hsv_to_rgb(HUES[COLORS.index(color)] / 360, 0.9, 0.9)
        image = draw_shape(64, shape["shape"], radius, np.array(rgb) * 255)
        return torch.from_numpy(image).permute(2, 0, 1)


def test_held_out_scores_are_apart_from_seen_ones(held_out_data):
    perfect = evaluate_generated(DrawingModel(), held_out_data, n=60)
    assert perfect["n"] == 60 and perfect["heldout_n"] == 60
    for key in ("color_acc", "shape_acc", "size_acc"):
        assert perfect[key] == perfect[f"heldout_{key}"] == 1.0, perfect
    # Drawing the held-out combinations in a seen colour fails their colour only.
    seen_only = evaluate_generated(
        DrawingModel(swap={"red circle": "green", "blue square": "yellow"}), held_out_data,
        n=60)
    assert seen_only["color_acc"] == 1.0 and seen_only["heldout_color_acc"] == 0.0
    assert seen_only["heldout_shape_acc"] == seen_only["heldout_size_acc"] == 1.0


def test_cli_on_a_trained_run(held_out_data, tmp_path):
    run = tiny_run(held_out_data, tmp_path / "run", max_steps=2)
    result = CliRunner().invoke(main, ["eval", "attributes", "--run", str(run), "--n", "12",
                                       "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert set(scores) == {"color_acc", "shape_acc", "size_acc", "n", "heldout_color_acc",
                           "heldout_shape_acc", "heldout_size_acc", "heldout_n",
                           "two_shape_drawn", "two_shape_colors", "two_shape_both",
                           "two_shape_n"}
    assert scores["n"] == scores["heldout_n"] == 12
    table = CliRunner().invoke(main, ["eval", "attributes", "--run", str(run), "--n", "6"])
    lines = table.output.splitlines()
    assert lines[0].split() == ["attribute", "accuracy", "held-out"]
    assert lines[4].split() == ["images", "6", "6"]
