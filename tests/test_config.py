"""One source of training defaults: ``TrainConfig`` resolves ``auto`` and the preset's schedule,
and ``t2i-fast train`` is a shell over it, so the Python API and the command line train the
same job; config errors speak of fields and the command line of their flags."""

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from t2i_fast.cli import main
from t2i_fast.cli import train as train_cli
from t2i_fast.config import PAPER_SCHEDULE, SMALL_SCHEDULE, FieldError, TrainConfig
from t2i_fast.errors import ConfigError
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
    if expected.g_class_loss is None:  # G's weight of the class loss: D's
        expected = dataclasses.replace(expected, g_class_loss=expected.class_loss)
    assert tuple(getattr(api, field.name) for field in dataclasses.fields(expected)) == \
        dataclasses.astuple(expected)


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


def test_a_run_made_before_a_setting_existed_resumes_as_it_trained(tmp_path):
    """A config.json without the settings added since (the text pretraining's matching, the
    mode-seeking term, D's learning rate scale, the class loss, G's weight of it) reads as
    the training that run did, not as today's defaults."""
    made = TrainConfig(data="d", run="r", preset="small")
    values = dataclasses.asdict(made)
    for name in ("pretrain_match", "mode_seeking", "d_lr_scale", "class_loss", "g_class_loss",
                 "g_first_layer", "g_upsample", "g_coordinates", "r1", "g_layout", "g_z_dim"):
        del values[name]
    (tmp_path / "config.json").write_text(json.dumps(values))
    read = TrainConfig.load(tmp_path / "config.json")
    assert (read.pretrain_match, read.mode_seeking, read.d_lr_scale, read.class_loss,
            read.g_class_loss, read.g_first_layer, read.g_upsample, read.g_coordinates,
            read.r1, read.g_layout, read.g_z_dim) == (
        "class", 0.0, 1.0, 0.0, 0.0, "per-cell", "transposed", "none", 0.0, "single", 100)
    assert (made.d_lr_scale, made.class_loss, made.g_class_loss, made.g_first_layer) == (
        SMALL_SCHEDULE.d_lr_scale, SMALL_SCHEDULE.class_loss, 1.0, "uniform")
    assert TrainConfig(data="d", run="r", preset="reed").g_first_layer == "per-cell"
    assert TrainConfig(data="d", run="r", preset="small",
                       g_first_layer="per-cell").g_first_layer == "per-cell"
    # G's weight is the small preset's own; elsewhere it follows D's.
    assert TrainConfig(data="d", run="r", preset="small", class_loss=3.0).g_class_loss == 1.0
    assert TrainConfig(data="d", run="r", preset="reed", class_loss=3.0).g_class_loss == 3.0
    assert TrainConfig(data="d", run="r", preset="small", g_class_loss=5.0).g_class_loss == 5.0
    # A run with the class loss, made before G's weight was its own: G's took D's.
    (tmp_path / "config.json").write_text(json.dumps({**values, "class_loss": 10.0}))
    assert TrainConfig.load(tmp_path / "config.json").g_class_loss == 10.0
    values["class_loss"] = None  # what only a made config may say
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(ConfigError, match="class_loss must be set, got None"):
        TrainConfig.load(tmp_path / "config.json")


def test_the_new_weights_are_checked_where_the_flags_are_named(shapes, tmp_path):
    with pytest.raises(FieldError, match="class_loss must be at least 0"):
        TrainConfig(data="d", run="r", class_loss=-1.0)
    with pytest.raises(FieldError, match="g_class_loss must be at least 0"):
        TrainConfig(data="d", run="r", g_class_loss=-1.0)
    with pytest.raises(FieldError, match="g_first_layer must be one of"):
        TrainConfig(data="d", run="r", g_first_layer="diagonal")
    with pytest.raises(FieldError, match="g_upsample must be one of"):
        TrainConfig(data="d", run="r", g_upsample="pixel-shuffle")
    with pytest.raises(FieldError, match="g_coordinates must be one of"):
        TrainConfig(data="d", run="r", g_coordinates="polar")
    with pytest.raises(FieldError, match="g_layout must be one of"):
        TrainConfig(data="d", run="r", g_layout="stacked")
    with pytest.raises(FieldError, match=r"g_z_dim must be an integer in \[1, 4096\]"):
        TrainConfig(data="d", run="r", g_z_dim=0)
    with pytest.raises(FieldError, match="g_z_dim must be at least 11 with g_layout layered"):
        TrainConfig(data="d", run="r", g_layout="layered", g_z_dim=10)
    for flag, value, message in (("--d-lr-scale", "0", "must be positive, got 0.0"),
                                 ("--class-loss", "-2", "must be at least 0, got -2.0"),
                                 ("--g-class-loss", "-1", "must be at least 0, got -1.0")):
        result = CliRunner().invoke(main, ["train", "--data", str(shapes), "--run",
                                           str(tmp_path / "r"), flag, value])
        assert result.exit_code == 1
        assert result.output.strip() == f"Error: {flag} {message}"
    assert not (tmp_path / "r").exists()


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
