"""``t2i-fast sample`` and ``t2i-fast interpolate`` on a briefly trained run."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tiny_run
from PIL import Image

from t2i_fast.cli import main
from t2i_fast.data import Dataset
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


@pytest.fixture(scope="module")
def short_captions(tmp_path_factory):
    """Five records whose stored character indices keep 12 characters, where the run's text
    encoder learnt on 201."""
    path = tmp_path_factory.mktemp("sample_data") / "short.lmdb"
    make_shapes(out=path, n=5, seed=7, doc_length=12)
    return path


def test_sample_from_a_dataset(run, short_captions, tmp_path):
    out = tmp_path / "images"
    result = invoke("sample", "--run", run, "--data", short_captions, "--captions-per-image", 2,
                    "--seed", 3, "--batch-size", 3, "--out", out)
    assert result.exit_code == 0, result.output
    index = json.loads((out / "index.json").read_text())
    with Dataset(short_captions) as ds:
        expected = [(ds[i].key, ds[i].name, ds.classes[ds[i].class_id], c, ds[i].captions[c])
                    for i in range(len(ds)) for c in range(2)]
    assert len(index) == 5 * 2 == len(list(out.glob("*.png")))
    assert [(row["key"], row["name"], row["class_name"], row["caption_index"], row["caption"])
            for row in index] == expected
    assert all(row["seed"] == 3 and row["noise_index"] == 0 for row in index)
    # The caption is encoded at the run's length (201), not the dataset's 12 characters: the
    # image is the one --text gives for the whole caption, not for its first 12 characters.
    first = index[0]
    assert len(first["caption"]) > 12
    pictures = {}
    for label, text in (("whole", first["caption"]), ("cut", first["caption"][:12])):
        invoke("sample", "--run", run, "--text", text, "--n", 1, "--seed", 3, "--out",
               tmp_path / label)
        pictures[label] = np.asarray(Image.open(tmp_path / label / "00000_00.png"), dtype=int)
    ours = np.asarray(Image.open(out / first["file"]), dtype=int)
    assert np.abs(ours - pictures["whole"]).max() <= 1
    assert np.abs(ours - pictures["cut"]).max() > 1


def test_sample_from_a_dataset_by_class_and_limit(run, short_captions, tmp_path):
    with Dataset(short_captions) as ds:
        names = [ds.classes[ds[i].class_id] for i in range(len(ds))]
        counts = [len(ds[i].captions) for i in range(len(ds))]
    classes = tmp_path / "classes.txt"
    classes.write_text(f"{names[-1]}\n")
    out = tmp_path / "some"
    result = invoke("sample", "--run", run, "--data", short_captions, "--classes", classes,
                    "--captions-per-image", 255, "--n", 2, "--out", out)
    assert result.exit_code == 0, result.output
    index = json.loads((out / "index.json").read_text())
    keys = {row["key"] for row in index}
    assert keys == {f"{i:08d}" for i, name in enumerate(names) if name == names[-1]}
    assert {row["noise_index"] for row in index} == {0, 1}
    # Every caption of a record that has fewer than K, each twice (--n 2).
    assert len(index) == 2 * sum(c for c, name in zip(counts, names, strict=True)
                                 if name == names[-1])
    limited = tmp_path / "limited"
    assert invoke("sample", "--run", run, "--data", short_captions, "--limit", 2, "--out",
                  limited).exit_code == 0
    assert [row["key"] for row in json.loads((limited / "index.json").read_text())] == \
        ["00000000", "00000001"]
    grid = tmp_path / "grid.png"
    assert invoke("sample", "--run", run, "--data", short_captions, "--limit", 3,
                  "--out", grid).exit_code == 0
    with Image.open(grid) as picture:
        assert picture.width == 32 * 2 + 2 + 2 and picture.height > 3 * (32 * 2 + 2)


def test_sample_from_a_dataset_errors(run, short_captions, tmp_path):
    out = tmp_path / "x"
    both = invoke("sample", "--run", run, "--data", short_captions, "--text", "a", "--out", out)
    assert both.exit_code == 2 and "--data DATASET" in both.output
    alone = invoke("sample", "--run", run, "--text", "a", "--captions-per-image", 2, "--out",
                   out)
    assert alone.exit_code == 2 and "go with --data" in alone.output
    classes = tmp_path / "classes.txt"
    classes.write_text("green circle\nnot a class\n")
    unknown = invoke("sample", "--run", run, "--data", short_captions, "--classes", classes,
                     "--out", out)
    assert unknown.exit_code == 1
    assert f"Error: {classes}: line 2: unknown class 'not a class'" in unknown.output
    not_data = invoke("sample", "--run", run, "--data", tmp_path, "--out", out)
    assert not_data.exit_code == 1 and "Traceback" not in not_data.output
