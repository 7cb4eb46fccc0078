"""Training on the CPU: a smoke run, exact resumption, the variants, and bad input."""

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from t2i_fast.checkpoint_io import load_checkpoint
from t2i_fast.cli import main
from t2i_fast.errors import T2IError
from t2i_fast.generate import TrainedModel
from t2i_fast.models.batchnorm_stats import recompute_batchnorm_stats
from t2i_fast.models.coordinates import AddCoordinates
from t2i_fast.run import Run
from t2i_fast.style_transfer import load_style_encoder
from t2i_fast.train import TrainConfig, train
from t2i_fast.train.loop import Trainer


def config(shapes, run, **changes) -> TrainConfig:
    base = TrainConfig(data=str(shapes), run=str(run), preset="small", batch_size=8,
                       max_steps=20, log_every=5, sample_every=10, checkpoint_every=10,
                       keep_checkpoints=1, loader_threads=2, train_text_encoder=True)
    return dataclasses.replace(base, **changes)


def test_smoke_run_writes_everything(shapes, tmp_path):
    run = train(config=config(shapes, tmp_path / "run"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert {"d_loss", "g_loss", "d_real", "d_wrong", "d_fake", "images_per_s"} <= set(rows[0])
    assert rows[-1]["epoch"] == 3  # 5 batches of 8 an epoch
    assert all(torch.isfinite(torch.tensor([r["d_loss"], r["g_loss"]])).all() for r in rows)
    assert json.loads((run / "config.json").read_text())["variant"] == "int-cls"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000020.pt"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_00000010.png",
                                                                  "step_00000020.png"]
    with Image.open(run / "samples.png") as grid:
        assert grid.width == 8 * (32 * 2 + 2) + 2  # 8 noise columns of 32 px at scale 2
    with Image.open(run / "loss_curves.png") as curves:
        assert curves.size == (720, 420)


def parameters(run) -> dict[str, torch.Tensor]:
    state = load_checkpoint(Run(run).latest_checkpoint())
    flat = {}
    for part in ("G", "D", "G_ema", "text_encoder"):
        flat.update({f"{part}.{k}": v for k, v in state[part].items()})
    for part in ("opt_g", "opt_d"):
        for i, s in state[part]["state"].items():
            flat.update({f"{part}.{i}.{k}": v for k, v in s.items() if torch.is_tensor(v)})
    return flat


def test_resume_is_bit_identical(shapes, tmp_path):
    """7 steps straight = 3 steps + resume + 4 steps, crossing an epoch boundary."""
    straight = train(config=config(shapes, tmp_path / "straight", max_steps=7))
    cut = config(shapes, tmp_path / "cut", max_steps=3)
    train(config=cut)
    train(config=dataclasses.replace(cut, max_steps=7), resume=True)
    a, b = parameters(straight), parameters(tmp_path / "cut")
    assert a.keys() == b.keys() and len(a) > 50
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut/metrics.jsonl").open()]
    assert steps == [3, 5, 7]  # each run logs its last step; nothing is logged twice


def test_a_run_made_before_the_first_layer_setting_resumes_and_samples_as_it_trained(
        shapes, tmp_path):
    """Neither its config.json nor its checkpoint names G's first layer: it trained with the
    paper's per-cell layer, and resuming and sampling keep that, not the small preset's
    uniform one (the two have the same tensors, so nothing else would tell)."""
    made = config(shapes, tmp_path / "old", max_steps=3, g_first_layer="per-cell")
    train(config=made)
    run = Run(made.run)
    values = json.loads(run.config_file.read_text())
    del values["g_first_layer"]
    run.config_file.write_text(json.dumps(values))
    checkpoint = run.latest_checkpoint()
    state = torch.load(checkpoint, weights_only=True)
    del state["model_config"]["gan"]["first_layer"]
    torch.save(state, checkpoint)
    old = TrainConfig.load(run.config_file)
    assert old.g_first_layer == "per-cell" != config(shapes, "r").g_first_layer
    train(config=dataclasses.replace(old, max_steps=5), resume=True)
    after = load_checkpoint(run.latest_checkpoint())
    assert after["step"] == 5 and after["model_config"]["gan"]["first_layer"] == "per-cell"
    assert TrainedModel.load(made.run).generator.stages[0][0].cell_inputs is None
    uniform = train(config=config(shapes, tmp_path / "new", max_steps=1))
    assert TrainedModel.load(uniform).generator.stages[0][0].cell_inputs == 1


def test_r1_is_a_training_option_recorded_and_logged(shapes, tmp_path):
    """--r1 and --r1-every reach the run's config.json, and the steps that take the penalty
    (every second one here, the last of each two) log its value; a resumed run keeps it."""
    result = CliRunner().invoke(main, ["train", "--data", str(shapes), "--run",
                                       str(tmp_path / "r"), "--preset", "small",
                                       "--batch-size", "8", "--max-steps", "2",
                                       "--log-every", "1", "--train-text-encoder",
                                       "--r1", "0.5", "--r1-every", "2"])
    assert result.exit_code == 0, result.output
    run = Run(tmp_path / "r")
    made = TrainConfig.load(run.config_file)
    assert (made.r1, made.r1_every) == (0.5, 2)
    train(config=dataclasses.replace(made, max_steps=4), resume=True)
    logged = [json.loads(line) for line in run.metrics_file.read_text().splitlines()]
    assert [("r1" in row) for row in logged] == [False, True, False, True]
    assert all(row["r1"] > 0 for row in logged if "r1" in row)
    refused = CliRunner().invoke(main, ["train", "--data", str(shapes), "--run",
                                        str(tmp_path / "bad"), "--r1-every", "0"])
    assert refused.exit_code == 2 and "--r1-every" in refused.output


def _train_two_steps_and_resume(shapes, tmp_path, *flags: str) -> tuple[Run, TrainConfig, dict]:
    """``t2i-fast train`` of 2 steps with ``flags``, resumed to step 3: the run, its
    config.json and its last checkpoint."""
    result = CliRunner().invoke(main, ["train", "--data", str(shapes), "--run",
                                       str(tmp_path / "r"), "--preset", "small",
                                       "--batch-size", "8", "--max-steps", "2",
                                       "--train-text-encoder", *flags])
    assert result.exit_code == 0, result.output
    run = Run(tmp_path / "r")
    made = TrainConfig.load(run.config_file)
    train(config=dataclasses.replace(made, max_steps=3), resume=True)
    after = load_checkpoint(run.latest_checkpoint())
    assert after["step"] == 3
    return run, made, after


def test_a_resize_generator_trains_resumes_and_samples_as_it_trained(shapes, tmp_path):
    run, made, after = _train_two_steps_and_resume(shapes, tmp_path, "--g-upsample",
                                                   "bilinear")
    assert made.g_upsample == "bilinear"
    assert after["model_config"]["gan"]["upsample"] == "bilinear"
    G = TrainedModel.load(run.root).generator
    # G's doubling layers; the layered layout's background network resizes by nearest.
    assert [m.mode for name, m in G.named_modules() if isinstance(m, torch.nn.Upsample)
            and not name.startswith("background.")] == ["bilinear"] * 3
    assert G.state_dict().keys() == after["G_ema"].keys()


def test_a_coordconv_run_trains_resumes_and_samples_as_it_trained(shapes, tmp_path):
    run, made, after = _train_two_steps_and_resume(shapes, tmp_path, "--coord-conv", "both",
                                                   "--g-upsample", "nearest")
    assert (made.g_coordinates, made.g_upsample) == ("both", "nearest")
    assert after["model_config"]["gan"]["coordinates"] == "both"
    assert after["D"]["stages.0.1.weight"].shape[1] == 5  # D's first convolution: RGB, x, y
    G = TrainedModel.load(run.root).generator
    assert sum(isinstance(m, AddCoordinates) for m in G.modules()) == 3
    assert G.state_dict().keys() == after["G_ema"].keys()
    refused = CliRunner().invoke(main, ["train", "--data", str(shapes), "--run",
                                        str(tmp_path / "bad"), "--coord-conv", "polar"])
    assert refused.exit_code == 2 and "--coord-conv" in refused.output


def test_a_layered_run_trains_resumes_samples_and_gets_a_style_encoder_of_its_z(shapes,
                                                                                tmp_path):
    run, made, after = _train_two_steps_and_resume(shapes, tmp_path, "--g-layout", "layered",
                                                   "--g-z-dim", "12")
    assert (made.g_layout, made.g_z_dim) == ("layered", 12)
    assert (after["model_config"]["gan"]["layout"], after["model_config"]["gan"]["z_dim"]) == (
        "layered", 12)
    model = TrainedModel.load(run.root)
    assert model.z_dim == 12 and model.generator.layered
    assert model.generator.state_dict().keys() == after["G_ema"].keys()
    assert model.draw(["a small red circle"] * 2, seed=0).shape == (2, 32, 32, 3)
    styled = CliRunner().invoke(main, ["train-style", "--run", str(run.root), "--steps", "2",
                                       "--batch-size", "4", "--device", "cpu"])
    assert styled.exit_code == 0, styled.output
    encoder = load_style_encoder(run, device=torch.device("cpu")).encoder
    assert encoder.to_z.out_features == 12
    # An encoder of the preset's own z (100) is not this run's.
    state = torch.load(run.style_encoder, weights_only=True)
    state["style_config"]["z_dim"] = 100
    torch.save(state, run.style_encoder)
    with pytest.raises(T2IError, match="made for another architecture than the run's "
                                       "generator .preset 'small', z of 12"):
        load_style_encoder(run, device=torch.device("cpu"))
    refused = CliRunner().invoke(main, ["train", "--data", str(shapes), "--run",
                                        str(tmp_path / "bad"), "--g-layout", "layered",
                                        "--g-z-dim", "10"])
    assert refused.exit_code == 1
    assert "--g-z-dim must be at least 11 with --g-layout layered" in refused.output


@pytest.mark.parametrize("variant", ["gan", "cls", "int"])
def test_variants_train(shapes, tmp_path, variant):
    run = train(config=config(shapes, tmp_path / variant, variant=variant, max_steps=2,
                              log_every=1))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert ("d_wrong" in rows[0]) == (variant == "cls")


def test_a_frozen_pretrained_text_encoder_stays_frozen(shapes, tmp_path):
    first = train(config=config(shapes, tmp_path / "first", max_steps=1))
    state = load_checkpoint(Run(first).latest_checkpoint())
    encoder = tmp_path / "text.pt"
    torch.save({"text_encoder": state["text_encoder"], "text_config": state["text_config"]},
               encoder)
    run = train(config=config(shapes, tmp_path / "frozen", max_steps=3,
                              text_encoder=str(encoder), train_text_encoder=False))
    after = load_checkpoint(Run(run).latest_checkpoint())["text_encoder"]
    for k, v in state["text_encoder"].items():
        assert torch.equal(v, after[k]), k


def invoke(*args):
    return CliRunner().invoke(main, ["train", *map(str, args)])


def test_cli_errors_are_one_line_and_touch_nothing(shapes, tmp_path):
    run = tmp_path / "run"
    result = invoke("--data", tmp_path / "missing.lmdb", "--run", run)
    assert result.exit_code == 1 and "missing.lmdb: not a t2i-fast dataset" in result.output
    assert not run.exists()
    ok = invoke("--data", shapes, "--run", run, "--max-steps", 1, "--batch-size", 8,
                "--preset", "small", "--train-text-encoder")
    assert ok.exit_code == 0, ok.output
    before = sorted(p.name for p in run.rglob("*"))
    again = invoke("--data", shapes, "--run", run)
    assert again.exit_code == 1 and "run folder exists" in again.output
    mixed = invoke("--resume", run, "--lr", 0.1)
    assert mixed.exit_code == 1 and "only --epochs and --max-steps" in mixed.output
    assert sorted(p.name for p in run.rglob("*")) == before
    # A checkpoint of another architecture: the run's config now names another preset.
    settings = json.loads((run / "config.json").read_text())
    settings["preset"] = "dcgan"
    (run / "config.json").write_text(json.dumps(settings))
    other = invoke("--resume", run, "--max-steps", 2)
    assert other.exit_code == 1 and "checkpoint of another architecture" in other.output
    assert [line.startswith("Error:") for line in other.output.strip().splitlines()][-1]


def test_without_an_encoder_pretraining_runs_first(shapes, tmp_path):
    run = train(config=config(shapes, tmp_path / "run", max_steps=2, train_text_encoder=False,
                              pretrain_epochs=1))
    settings = json.loads((run / "config.json").read_text())
    assert settings["text_encoder"] == str(run / "text" / "text_encoder.pt")
    evaluation = json.loads((run / "text" / "evaluation.json").read_text())
    assert evaluation["classes"] >= 2 and 0 <= evaluation["zero_shot_top1"] <= 1
    pretrained = torch.load(run / "text" / "text_encoder.pt")["text_encoder"]
    trained = load_checkpoint(Run(run).latest_checkpoint())["text_encoder"]
    assert all(torch.equal(v, trained[k]) for k, v in pretrained.items()), "kept frozen"


def test_a_failed_start_leaves_no_run_folder(shapes, tmp_path):
    wrong = tmp_path / "wrong.pt"
    torch.save({"text_encoder": {}, "text_config": {"embedding_dim": 3}}, wrong)
    with pytest.raises(Exception, match="another architecture"):
        train(config=config(shapes, tmp_path / "run", text_encoder=str(wrong),
                            train_text_encoder=False))
    assert not (tmp_path / "run").exists()


def test_zero_shot_classes_are_fixed_and_bounded():
    from t2i_fast.train.pretrain_text import zero_shot_classes

    a = zero_shot_classes(24, 0.25, seed=0)
    assert len(a) == 6 and len(set(a.tolist())) == 6 and a.max() < 24
    assert (a == zero_shot_classes(24, 0.25, seed=0)).all()
    assert len(zero_shot_classes(24, 0.0, seed=0)) == 0
    assert len(zero_shot_classes(5, 0.1, seed=0)) == 2, "at least two to rank"


def test_pretrain_text_command(shapes, tmp_path):
    out = tmp_path / "text"
    result = CliRunner().invoke(main, ["pretrain-text", "--data", str(shapes), "--out", str(out),
                                       "--epochs", "1", "--batch-size", "8",
                                       "--holdout-share", "0.3"])
    assert result.exit_code == 0, result.output
    assert "zero_shot_top1" in result.output and "text_encoder.pt" in result.output
    state = torch.load(out / "text_encoder.pt")
    assert len(state["held_out_classes"]) == 7 and state["preset"] == "small"
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").open()] == [0]
    again = CliRunner().invoke(main, ["pretrain-text", "--data", str(shapes), "--out", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output


@pytest.mark.parametrize("match", ["class", "instance"])
def test_pretraining_matches_by_class_or_by_image(shapes, tmp_path, monkeypatch, match):
    """class: the SJE loss's labels are class ids and each text feature is its class's mean in
    the batch; instance: every image is its own label, its feature its own caption's."""
    from t2i_fast.train import pretrain_text as module

    seen = []

    def recording(image_emb, text_emb, labels):
        seen.append((text_emb.detach().clone(), labels.clone()))
        return module.sje_loss.__wrapped__(image_emb, text_emb, labels)

    recording.__wrapped__ = module.sje_loss
    monkeypatch.setattr(module, "sje_loss", recording)
    result = CliRunner().invoke(main, ["pretrain-text", "--data", str(shapes), "--out",
                                       str(tmp_path / "t"), "--epochs", "1", "--batch-size",
                                       "16", "--holdout-share", "0", "--match", match])
    assert result.exit_code == 0, result.output
    text, labels = seen[0]
    if match == "instance":
        assert len(set(labels.tolist())) == len(labels)
    else:
        assert len(set(labels.tolist())) < len(labels), "16 images of 24 classes share one"
    for label in labels.unique():  # rows of one label carry one feature (their class mean)
        rows = text[labels == label]
        torch.testing.assert_close(rows, rows[:1].expand_as(rows))
    assert json.loads((tmp_path / "t" / "config.json").read_text())["match"] == match


def test_backbone_options_go_together_and_need_torchvision(shapes, tmp_path):
    weights = tmp_path / "w.pt"
    torch.save({}, weights)
    alone = CliRunner().invoke(main, ["pretrain-text", "--data", str(shapes), "--out",
                                      str(tmp_path / "a"), "--image-backbone", "resnet18"])
    assert alone.exit_code == 1 and "go together" in alone.output
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):  # absent, or not built for this torch
        result = CliRunner().invoke(main, [
            "pretrain-text", "--data", str(shapes), "--out", str(tmp_path / "b"),
            "--image-backbone", "resnet18", "--backbone-weights", str(weights),
            "--batch-size", "8"])
        assert result.exit_code == 1 and "needs torchvision" in result.output
    else:
        result = CliRunner().invoke(main, [
            "pretrain-text", "--data", str(shapes), "--out", str(tmp_path / "b"),
            "--image-backbone", "resnet18", "--backbone-weights", str(weights),
            "--batch-size", "8"])
        assert result.exit_code == 1 and "cannot load as torchvision 'resnet18'" in result.output
    assert not (tmp_path / "b").exists()


def test_samples_come_from_the_moving_average(shapes, tmp_path):
    """The checkpoint's average lags G's weights and carries BatchNorm statistics of its own
    weights: those of train-mode forwards over the trainer's calibration batches."""
    run = train(config=config(shapes, tmp_path / "run", max_steps=3, ema_decay=0.5))
    state = load_checkpoint(Run(run).latest_checkpoint())
    ema, raw = state["G_ema"], state["G"]
    weights = [k for k in raw if raw[k].is_floating_point() and "running" not in k]
    assert any(not torch.equal(raw[k], ema[k]) for k in weights), "the average lags G"
    trainer = Trainer(config(shapes, tmp_path / "other"))
    trainer.G_ema.load_state_dict(ema)
    trainer.text_encoder.load_state_dict(state["text_encoder"])
    with torch.no_grad():
        inputs = [(z, trainer.text_encoder.eval().encode_mean(captions))
                  for captions, z in trainer._calibration]
    recompute_batchnorm_stats(trainer.G_ema, inputs)
    own = trainer.G_ema.state_dict()
    stats = [k for k in raw if "running" in k]
    assert any(not torch.equal(raw[k], ema[k]) for k in stats), "not G's statistics"
    for k in stats:
        torch.testing.assert_close(ema[k], own[k], msg=k)
    off = train(config=config(shapes, tmp_path / "off", max_steps=1, ema_decay=0.0))
    assert load_checkpoint(Run(off).latest_checkpoint())["G_ema"] is None
