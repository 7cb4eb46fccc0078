"""``t2i-fast info`` and ``t2i-fast stream`` through click's runner."""

import json

import pytest
from click.testing import CliRunner
from conftest import write_random_dataset

from t2i_fast.cli import main


def test_info_json_has_the_promised_keys(random_dataset):
    result = CliRunner().invoke(main, ["info", str(random_dataset), "--json"])
    assert result.exit_code == 0, result.output
    meta = json.loads(result.output)
    for key in ("format_version", "count", "captions_per_image", "image_size", "encoding",
                "doc_length", "classes", "split"):
        assert key in meta
    assert meta["count"] == 37 and meta["classes"] == ["class0", "class1", "class2"]
    assert meta["image_size"] == [20, 20] and meta["encoding"] == "raw"


def test_info_for_people(random_dataset):
    result = CliRunner().invoke(main, ["info", str(random_dataset)])
    assert result.exit_code == 0, result.output
    assert "images              37" in result.output
    assert "3: class0 (" in result.output


def test_info_on_a_missing_dataset_is_one_error_line(tmp_path):
    result = CliRunner().invoke(main, ["info", str(tmp_path / "nope.lmdb")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {tmp_path / 'nope.lmdb'}: not a t2i-fast dataset (no data.mdb; make one with "
        "'t2i-fast prepare')"]


def test_stream_prints_throughput_per_epoch(tmp_path):
    path = write_random_dataset(tmp_path / "d.lmdb", n=50, size=24)
    result = CliRunner().invoke(main, ["stream", "--data", str(path), "--epochs", "2",
                                       "--batch-size", "8", "--threads", "2"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines if "samples/s" in line] == ["epoch 0", "epoch 1"]
    assert "48 samples in" in lines[-1]  # 6 full batches of 8


def test_stream_makes_the_built_in_dataset_when_absent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["stream", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "making the built-in shapes dataset at shapes.lmdb" in result.output
    assert "shapes.lmdb: 10000 images, 156 batches of 64" in result.output
    assert (tmp_path / "shapes.lmdb" / "data.mdb").is_file()


@pytest.mark.parametrize("command", [
    ["train", "--max-steps", "1", "--batch-size", "8", "--train-text-encoder"],
    ["pretrain-text", "--out", "text", "--epochs", "1", "--batch-size", "8"]])
def test_training_commands_make_the_built_in_dataset_when_absent(tmp_path, monkeypatch,
                                                                 command):
    """The README's main job is `t2i-fast train` in an empty folder (a smaller dataset here)."""
    from t2i_fast.prepare import shapes

    make_shapes = shapes.make_shapes
    monkeypatch.setattr(shapes, "make_shapes", lambda *, out: make_shapes(out=out, n=40))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [*command, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "making the built-in shapes dataset at shapes.lmdb" in result.output
    assert (tmp_path / "shapes.lmdb" / "data.mdb").is_file()


def test_every_command_shows_defaults_in_help():
    for command in (["stream"], ["info"], ["prepare", "shapes"], ["prepare", "cub"]):
        result = CliRunner().invoke(main, [*command, "--help"])
        assert result.exit_code == 0
    assert "[default: 64" in CliRunner().invoke(main, ["stream", "--help"]).output
