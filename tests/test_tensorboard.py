"""``--tensorboard``: the JSONL rows and the sample grids as TensorBoard events, read back
the way TensorBoard reads them; resumed runs; a missing package."""

import dataclasses
import io
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tiny_run
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from t2i_fast.checkpoint_io import load_checkpoint
from t2i_fast.cli import main
from t2i_fast.run import Run, TextEncoderFolder, read_jsonl
from t2i_fast.train import TrainConfig, train
from t2i_fast.train.loop import Trainer
from t2i_fast.train.signals import StopSignals, TrainingStopped


def invoke(*args):
    return CliRunner().invoke(main, [*map(str, args)])


def events(folder: Path) -> EventAccumulator:
    """Every event in ``folder``, as TensorBoard shows them (0: keep all, not a sample)."""
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def scalars(accumulator: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def logged(rows: list[dict], *, step_key: str) -> dict[str, list[tuple[int, float]]]:
    """The rows' numbers as TensorBoard keeps them: float32."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key != step_key:
                series.setdefault(key, []).append((row[step_key], float(np.float32(value))))
    return series


def images(accumulator: EventAccumulator, tag: str = "samples") -> dict[int, np.ndarray]:
    return {e.step: np.asarray(Image.open(io.BytesIO(e.encoded_image_string)))
            for e in accumulator.Images(tag)}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"))


def test_train_writes_every_logged_row_and_sample_grid(shapes, tmp_path):
    run = Run(tiny_run(shapes, tmp_path / "run", tensorboard=True, max_steps=4, log_every=1,
                       sample_every=2, train_text_encoder=False, pretrain_epochs=1))
    rows = run.metrics()
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert {"d_loss", "g_loss", "lr", "images_per_s", "epoch"} <= set(rows[0])
    assert scalars(events(run.tensorboard)) == logged(rows, step_key="step")
    grids = images(events(run.tensorboard))
    assert sorted(grids) == [2, 4]
    for step, grid in grids.items():
        assert np.array_equal(grid, pixels(run.sample_grid_path(step)))
    # Its own text pretraining's epochs, beside it.
    assert scalars(events(run.text.tensorboard)) == \
        logged(read_jsonl(run.text.metrics), step_key="epoch")


def _wait_for_the_next_second() -> None:
    # TensorBoard reads a folder's event files in name order, and a name starts with the
    # second the file was made: a session's file must sort after the one it resumes.
    second = int(time.time())
    while int(time.time()) == second:
        time.sleep(0.05)


def test_a_resumed_run_replaces_the_events_after_its_checkpoint(shapes, tmp_path):
    path = tiny_run(shapes, tmp_path / "run", tensorboard=True, max_steps=3, log_every=1,
                    sample_every=2, checkpoint_every=2)
    run = Run(path)
    # Killed after step 3 was logged and sampled but before its checkpoint was written.
    run.latest_checkpoint().unlink()
    assert load_checkpoint(run.latest_checkpoint())["step"] == 2
    _wait_for_the_next_second()
    train(config=dataclasses.replace(run.config(), max_steps=4), resume=True)
    rows = run.metrics()
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    # One value a step, step 3's from the resumed session (images/s differs between them).
    assert scalars(events(run.tensorboard)) == logged(rows, step_key="step")
    grids = images(events(run.tensorboard))
    assert sorted(grids) == [2, 4]  # the killed session's grid at step 3 is dropped
    assert np.array_equal(grids[4], pixels(run.sample_grid_path(4)))


def test_a_signal_stop_leaves_the_events_up_to_its_checkpoint(shapes, tmp_path):
    config = TrainConfig(data=str(shapes), run=str(tmp_path / "run"), preset="small",
                         batch_size=8, max_steps=5, train_text_encoder=True, log_every=1,
                         tensorboard=True)
    Path(config.run).mkdir()
    trainer = Trainer(config)
    stop = StopSignals()
    stop.received = signal.SIGTERM
    with pytest.raises(TrainingStopped):
        trainer.fit(stop=stop)
    rows = Run(config.run).metrics()
    assert [row["step"] for row in rows] == [1]
    assert scalars(events(Run(config.run).tensorboard)) == logged(rows, step_key="step")


def test_resume_may_turn_tensorboard_on(shapes, tmp_path):
    run = Run(tiny_run(shapes, tmp_path / "run", log_every=1))
    assert not run.tensorboard.exists()
    result = invoke("train", "--resume", run.root, "--max-steps", 2, "--tensorboard")
    assert result.exit_code == 0, result.output
    assert run.config().tensorboard
    assert scalars(events(run.tensorboard)) == logged(run.metrics()[1:], step_key="step")


def test_pretrain_text_writes_each_epochs_metrics(shapes, tmp_path):
    out = TextEncoderFolder(tmp_path / "text")
    result = invoke("pretrain-text", "--data", shapes, "--out", out.root, "--preset", "small",
                    "--epochs", 2, "--batch-size", 8, "--device", "cpu", "--tensorboard")
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out.metrics)
    assert [row["epoch"] for row in rows] == [0, 1]
    assert scalars(events(out.tensorboard)) == logged(rows, step_key="epoch")


@pytest.mark.parametrize("command", [
    ["train", "--run", "{out}", "--preset", "small", "--batch-size", 8, "--max-steps", 1,
     "--train-text-encoder", "--device", "cpu"],
    ["pretrain-text", "--out", "{out}", "--preset", "small", "--epochs", 1, "--device", "cpu"],
], ids=["train", "pretrain-text"])
def test_without_the_package_it_says_how_to_install_it(command, shapes, tmp_path,
                                                       monkeypatch):
    # None in sys.modules makes the import fail, as where tensorboard is not installed; torch's
    # wrapper module is imported again, as on such a machine.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    out = tmp_path / "out"
    args = [str(out) if a == "{out}" else a for a in command]
    result = invoke(*args, "--data", shapes, "--tensorboard")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: --tensorboard needs the tensorboard package")
    assert lines[0].endswith(": pip install 't2i-fast[tensorboard]'")
    assert not out.exists(), "nothing is written"
