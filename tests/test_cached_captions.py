"""The frozen text encoder's path through training: every caption embedded once, the loader's
caption ids gathered from that table in the step (no GRU there), against the encoder's path."""

import copy
import dataclasses

import pytest
import torch
from conftest import write_random_dataset
from torch import nn

from t2i_fast.checkpoint_io import load_checkpoint
from t2i_fast.data import Dataset, Loader
from t2i_fast.models import Discriminator, Generator, TextEncoder, preset
from t2i_fast.run import Run
from t2i_fast.train import TrainConfig, train
from t2i_fast.train.caption_table import embed_all_captions
from t2i_fast.train.engine import StepEngine
from t2i_fast.train.loop import SAMPLE_ROWS, Trainer

BATCH = 4


def engine(*, frozen: bool, table=None, seed: int = 0) -> StepEngine:
    torch.manual_seed(seed)
    models = preset("small")
    G, D = Generator(models.gan), Discriminator(models.gan)
    text = TextEncoder(models.text)
    text.requires_grad_(not frozen)
    # The paper's losses: the mode-seeking term's 1 / distance would magnify float32 rounding
    # of the two text paths beyond the tolerances that tell them apart.
    config = TrainConfig(data="-", run="-", preset="small", batch_size=BATCH,
                         text_encoder="-" if frozen else None, mode_seeking=0.0,
                         class_loss=0.0)
    return StepEngine(G=G, D=D, text_encoder=text, G_ema=copy.deepcopy(G).requires_grad_(False),
                      config=config, device=torch.device("cpu"),
                      noise=torch.Generator().manual_seed(1), backend="eager",
                      precision="fp32", caption_table=table)


def first_batch(shapes, caption_format: str):
    with Loader(shapes, batch_size=BATCH, seed=0, dtype=torch.float32, layout="nhwc",
                caption_format=caption_format, num_threads=1) as loader:
        return next(iter(loader))


def test_the_table_step_computes_the_encoder_steps_losses(shapes):
    """Eager float32, same weights, batch and noise: the step on caption ids gathered from the
    table gives the losses of the step that runs the frozen encoder on the characters (to
    float32 rounding: the table encodes the captions in other batches than the step)."""
    by_chars = engine(frozen=True)
    table = embed_all_captions(dataset_path=shapes, text_encoder=by_chars.text_encoder)
    by_ids = engine(frozen=True, table=table)
    want = by_chars.step(first_batch(shapes, "onehot"), step=0)
    got = by_ids.step(first_batch(shapes, "ids"), step=0)
    assert set(got) == set(want) == {"d_loss", "g_loss", "d_real", "d_wrong", "d_fake"}
    for key in want:
        assert got[key].item() == pytest.approx(want[key].item(), rel=1e-6, abs=1e-7), key
    for a, b in zip(by_ids.G.parameters(), by_chars.G.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def recurrent_ops(step) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return sorted({e.key for e in prof.key_averages()
                   if any(word in e.key.lower() for word in ("gru", "rnn", "lstm"))})


class Calls:
    def __init__(self, module: nn.Module):
        self.count = 0
        module.register_forward_pre_hook(lambda *_: setattr(self, "count", self.count + 1))


def test_no_recurrent_op_in_the_frozen_step_and_the_joint_one_runs_the_encoder(shapes):
    frozen = engine(frozen=True)
    table = embed_all_captions(dataset_path=shapes, text_encoder=frozen.text_encoder)
    frozen = engine(frozen=True, table=table)
    joint = engine(frozen=False)
    calls = Calls(frozen.text_encoder), Calls(joint.text_encoder)
    ids, onehot = first_batch(shapes, "ids"), first_batch(shapes, "onehot")
    assert recurrent_ops(lambda: frozen.step(ids, step=0)) == []
    assert calls[0].count == 0
    # The profile does see the GRU where the step runs it: the joint encoder's.
    assert recurrent_ops(lambda: joint.step(onehot, step=0)) != []
    assert calls[1].count == 1
    with pytest.raises(ValueError, match="needs a frozen text encoder"):
        engine(frozen=False, table=table)


def frozen_config(shapes, tmp_path, **changes) -> TrainConfig:
    encoder = tmp_path / "text.pt"
    if not encoder.exists():
        torch.manual_seed(0)
        models = preset("small")
        torch.save({"text_encoder": TextEncoder(models.text).state_dict(),
                    "text_config": dataclasses.asdict(models.text)}, encoder)
    return TrainConfig(data=str(shapes), run=str(tmp_path / "run"), preset="small",
                       batch_size=8, max_steps=3, log_every=1, sample_every=2,
                       checkpoint_every=2, keep_checkpoints=1, loader_threads=1,
                       text_encoder=str(encoder), **changes)


def test_a_frozen_run_trains_on_caption_ids_and_resumes_bit_identically(shapes, tmp_path):
    config = frozen_config(shapes, tmp_path)
    trainer = Trainer(config)
    assert trainer.loader.caption_format == "ids"
    assert trainer.caption_table.shape == (trainer.loader.num_captions,
                                           trainer.models.gan.embedding_dim)
    assert all(captions.dtype == torch.int64 and captions.dim() == 2
               for captions, _ in trainer._calibration)
    # The sample grid's captions are the table's rows of the chosen records' first captions.
    inputs, _, captions = trainer._fixed
    assert inputs.shape == (SAMPLE_ROWS, 1) and len(captions) == SAMPLE_ROWS
    straight = train(config=dataclasses.replace(config, run=str(tmp_path / "straight"),
                                                max_steps=5))
    cut = dataclasses.replace(config, run=str(tmp_path / "cut"))
    train(config=cut)
    train(config=dataclasses.replace(cut, max_steps=5), resume=True)
    a = load_checkpoint(Run(straight).latest_checkpoint())
    b = load_checkpoint(Run(tmp_path / "cut").latest_checkpoint())
    assert "caption_table" not in b  # derived state, made again on resume
    for part in ("G", "D", "G_ema", "text_encoder"):
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), f"{part}.{name}"


def test_a_dataset_without_classes_shows_its_first_records(tmp_path):
    """One class (COCO): the grid's rows are the first records, not one record repeated."""
    data = write_random_dataset(tmp_path / "coco.lmdb", classes=1, n=12, size=32)
    trainer = Trainer(TrainConfig(data=str(data), run=str(tmp_path / "run"), preset="small",
                                  batch_size=4, train_text_encoder=True, loader_threads=1))
    _, _, captions = trainer._fixed
    with Dataset(data) as ds:
        assert captions == [ds[i].captions[0] for i in range(SAMPLE_ROWS)]
