"""One source of training defaults: ``TrainConfig`` resolves ``auto`` and the preset's schedule,
and ``t2i-fast train`` is a shell over it, so the Python API and the command line train the
same job; config errors speak of fields and the command line of their flags."""

import dataclasses

import pytest
import torch
from click.testing import CliRunner

from t2i_fast.cli import main
from t2i_fast.cli import train as train_cli
from t2i_fast.config import PAPER_SCHEDULE, SMALL_SCHEDULE, FieldError, TrainConfig
from t2i_fast.train.pretrain_text import PretrainConfig


def _cli_config(monkeypatch, *args) -> TrainConfig:
    """The config ``t2i-fast train ARGS`` would train, without training."""
    made = []
    monkeypatch.setattr(train_cli, "train", lambda *, config, world: made.append(config) or
                        config.run)
    result = CliRunner().invoke(main, ["train", *map(str, args)])
    assert result.exit_code == 0, result.output
    return made[0]


@pytest.mark.parametrize("preset", [None, "small", "reed", "dcgan"])
def test_the_command_line_and_the_python_api_train_the_same_job(shapes, tmp_path, monkeypatch,
                                                                preset):
    given = {"preset": preset} if preset else {}
    flags = ["--preset", preset] if preset else []
    cli = _cli_config(monkeypatch, "--data", shapes, "--run", tmp_path / "r", *flags)
    api = TrainConfig(data=str(shapes), run=str(tmp_path / "r"), **given)
    assert cli == api
    expected = SMALL_SCHEDULE if (preset or "small") == "small" else PAPER_SCHEDULE
    assert (api.epochs, api.pretrain_epochs, api.pretrain_match) == dataclasses.astuple(expected)


def test_auto_resolves_by_the_device(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = TrainConfig(data="d", run="r")
    assert (gpu.preset, gpu.epochs, gpu.pretrain_epochs) == (
        "reed", PAPER_SCHEDULE.epochs, PAPER_SCHEDULE.pretrain_epochs)
    ran = gpu.on_device(torch.device("cuda"))
    assert (ran.backend, ran.precision) == ("compiled", "bf16")
    cpu = TrainConfig(data="d", run="r", device="cpu").on_device(torch.device("cpu"))
    assert (cpu.preset, cpu.epochs, cpu.backend, cpu.precision) == (
        "small", SMALL_SCHEDULE.epochs, "eager", "fp32")
    told = TrainConfig(data="d", run="r", epochs=3, pretrain_epochs=1, backend="eager")
    assert (told.epochs, told.pretrain_epochs) == (3, 1)
    assert told.on_device(torch.device("cuda")).precision == "fp32"
    # Resolved once: a config written and read back is the config made.
    ran.save(tmp_path / "config.json")
    assert TrainConfig.load(tmp_path / "config.json") == ran == dataclasses.replace(ran)


def test_config_errors_name_fields_and_the_command_line_names_flags(shapes, tmp_path):
    with pytest.raises(FieldError, match="holdout_share must be in") as caught:
        PretrainConfig(data="d", out="o", holdout_share=1.5)
    assert caught.value.field == "holdout_share"
    with pytest.raises(FieldError, match="image_backbone and backbone_weights go together"):
        PretrainConfig(data="d", out="o", image_backbone="resnet18")
    result = CliRunner().invoke(main, ["pretrain-text", "--data", str(shapes), "--out",
                                       str(tmp_path / "t"), "--holdout-share", "1.5"])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: --holdout-share must be in [0, 1), got 1.5"
    result = CliRunner().invoke(main, ["pretrain-text", "--data", str(shapes), "--out",
                                       str(tmp_path / "t"), "--image-backbone", "resnet18"])
    assert result.output.strip() == "Error: --image-backbone and --backbone-weights go together"
    assert not (tmp_path / "t").exists()
