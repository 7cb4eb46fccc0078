"""Bad options and files end in one ``Error:`` line naming the cause, never a traceback; output
paths get their folders made."""

import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_run
from PIL import Image

from t2i_fast.cli import main
from t2i_fast.config import FieldError
from t2i_fast.errors import ConfigError
from t2i_fast.train import TrainConfig


def invoke(*args):
    return CliRunner().invoke(main, [*map(str, args)])


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def run(shapes, tmp_path_factory):
    return tiny_run(shapes, tmp_path_factory.mktemp("cli_errors") / "run")


def test_cuda_device_without_cuda(shapes, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for device in ("cuda", "cuda:1"):
        line = one_error_line(invoke("train", "--data", shapes, "--run", tmp_path / "r",
                                     "--device", device, "--batch-size", 8,
                                     "--train-text-encoder", "--max-steps", 1))
        assert f"--device '{device}': no CUDA device is available" in line
    line = one_error_line(invoke("train", "--data", shapes, "--run", tmp_path / "r",
                                 "--device", "gpu"))
    assert "--device 'gpu' is not a device" in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--lr", "nan", "--lr must be a finite number, got nan"),
    ("--lr", "-1", "--lr must be positive, got -1.0"),
    ("--lr", "inf", "--lr must be a finite number, got inf"),
    ("--beta1", "1.5", "--beta1 must be in [0, 1), got 1.5"),
    ("--interp-beta", "nan", "--interp-beta must be a finite number, got nan"),
    ("--ema-decay", "nan", "--ema-decay must be a finite number, got nan"),
])
def test_numeric_options_are_checked(shapes, tmp_path, flag, value, message):
    line = one_error_line(invoke("train", "--data", shapes, "--run", tmp_path / "r",
                                 "--batch-size", 8, "--train-text-encoder", "--max-steps", 1,
                                 flag, value))
    assert line == f"Error: {message}"
    assert not (tmp_path / "r").exists()


def test_learning_rates_of_the_other_trainers(shapes, run, tmp_path):
    line = one_error_line(invoke("pretrain-text", "--data", shapes, "--out", tmp_path / "t",
                                 "--preset", "small", "--epochs", 1, "--lr", "nan"))
    assert line == "Error: --lr must be a finite number, got nan"
    line = one_error_line(invoke("train-style", "--run", run, "--steps", 1, "--lr", "nan"))
    assert line == "Error: --lr must be a finite number, got nan"
    assert not (tmp_path / "t").exists()


def test_config_fields_are_checked_by_type():
    with pytest.raises(FieldError, match="batch_size must be an integer, got '64'") as caught:
        TrainConfig(data="d", run="r", batch_size="64")
    assert caught.value.field == "batch_size"
    with pytest.raises(FieldError, match="train_text_encoder must be true or false, got 1"):
        TrainConfig(data="d", run="r", train_text_encoder=1)
    with pytest.raises(FieldError, match="max_steps must be an integer or null, got 2.5"):
        TrainConfig(data="d", run="r", max_steps=2.5)
    with pytest.raises(FieldError, match="lr must be a finite number, got nan"):
        TrainConfig(data="d", run="r", lr=math.nan)
    assert TrainConfig(data="d", run="r", lr=1).lr == 1  # a hand-written 1 for 1.0


@pytest.mark.parametrize(("change", "message"), [
    ({"batch_size": "64"}, "batch_size must be an integer, got '64'"),
    ({"lr": "fast"}, "lr must be a finite number, got 'fast'"),
    ({"epochs": None}, "epochs must be set, got None: a run records the value it trained with"),
    ({"data": None}, "data must be a string, got None"),
])
def test_a_config_json_with_a_wrong_type_names_file_and_field(run, tmp_path, change, message):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = copy / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    with pytest.raises(ConfigError, match=f"{config}: {message}"):
        TrainConfig.load(config)
    for args in (("train", "--resume", copy), ("report", "--run", copy)):
        assert one_error_line(invoke(*args)) == f"Error: {config}: {message}"


def test_a_config_json_of_another_shape(tmp_path):
    config = tmp_path / "config.json"
    config.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="config.json: not a run's configuration"):
        TrainConfig.load(config)
    config.write_text(json.dumps({"data": "d"}))
    with pytest.raises(ConfigError, match=r"config.json: settings \['run'\] missing"):
        TrainConfig.load(config)


def test_outputs_get_their_folders_made(run, shapes, tmp_path):
    styled = tmp_path / "styled"
    shutil.copytree(run, styled)
    assert invoke("train-style", "--run", styled, "--steps", 1, "--batch-size", 2,
                  "--device", "cpu").exit_code == 0
    query = tmp_path / "query.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(query)
    outputs = {
        "sample": ("sample", "--run", run, "--text", "a red circle", "--n", 2),
        "interpolate": ("interpolate", "--run", run, "--text", "a red circle"),
        "report": ("report", "--run", run),
        "style-transfer": ("style-transfer", "--run", styled, "--image", query, "--text",
                           "a red circle"),
        "preview": ("preview", shapes, "--rows", 2, "--views", 1),
    }
    for name, args in outputs.items():
        out = tmp_path / "new" / name / ("out.html" if name == "report" else "out.png")
        result = invoke(*args, "--out", out)
        assert result.exit_code == 0, (name, result.output)
        assert out.is_file(), name
    folder = tmp_path / "new" / "sampled" / "images"
    assert invoke(*outputs["sample"], "--out", folder).exit_code == 0
    assert (folder / "index.json").is_file()


def test_outputs_that_cannot_be_written(run, shapes, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    line = one_error_line(invoke("interpolate", "--run", run, "--text", "a red circle",
                                 "--out", blocker / "walk.png"))
    assert f"{blocker}: cannot make this folder" in line
    line = one_error_line(invoke("preview", shapes, "--out", tmp_path / "grid.xyz"))
    assert f"{tmp_path / 'grid.xyz'}: cannot write a picture of this kind" in line
    line = one_error_line(invoke("sample", "--run", run, "--text", "a", "--out", blocker))
    assert f"{blocker}: cannot make this folder" in line
