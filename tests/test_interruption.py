"""Runs and datasets that survive interruption: a kill or a signal at any stage of `train`,
a full disk in `train` and `prepare`, and `prepare --overwrite` cut short mid-swap. Each
ends in a state that the next command continues from, with nothing half-written left."""

import dataclasses
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import lmdb
import pytest
import torch
from click.testing import CliRunner

# Spawned processes import the worker by this top-level name (tests/ is on the path).
from distributed_worker import signalled_run  # noqa: E402

from t2i_fast import atomic
from t2i_fast import run as run_module
from t2i_fast.checkpoint_io import load_checkpoint
from t2i_fast.cli import main
from t2i_fast.data import Dataset
from t2i_fast.data import writer as writer_module
from t2i_fast.errors import T2IError
from t2i_fast.prepare.shapes import make_shapes
from t2i_fast.run import Run
from t2i_fast.train import TrainConfig, loop, train
from t2i_fast.train.signals import StopSignals, TrainingStopped


def settings(shapes, run, **changes) -> TrainConfig:
    """The small preset at batch 8 on the 40-image shapes dataset: 5 steps an epoch."""
    base = TrainConfig(data=str(shapes), run=str(run), preset="small", batch_size=8,
                       max_steps=1, log_every=1, sample_every=100, checkpoint_every=100,
                       keep_checkpoints=1, loader_threads=1, train_text_encoder=True)
    return dataclasses.replace(base, **changes)


def saved(run) -> dict:
    return json.loads((run / "config.json").read_text())


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# --- train: interrupted stages ---------------------------------------------------------------


def test_a_run_interrupted_in_pretraining_resumes_and_keeps_finished_stages(
        shapes, tmp_path, monkeypatch):
    run = tmp_path / "run"
    config = settings(shapes, run, train_text_encoder=False, pretrain_epochs=1)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # Killed in the middle of pretraining: the folder and its config stay, to be resumed.
    with monkeypatch.context() as patch:
        patch.setattr("t2i_fast.train.pretrain_text.sje_loss", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train(config=config)
    assert saved(run)["text_encoder"] is None
    assert (run / "text").is_dir() and not (run / "text" / "text_encoder.pt").exists()
    with pytest.raises(T2IError, match="run folder exists"):
        train(config=config)
    # Resumed, then killed after the pretraining finished: that is kept from now on.
    with monkeypatch.context() as patch:
        patch.setattr(loop.Trainer, "__init__", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train(config=config, resume=True)
    encoder = run / "text" / "text_encoder.pt"
    assert saved(run)["text_encoder"] == str(encoder)
    pretrained = load_checkpoint(encoder)["text_encoder"]
    with monkeypatch.context() as patch:
        patch.setattr(loop, "pretrain_text", lambda **_: pytest.fail("pretrained again"))
        train(config=TrainConfig.load(run / "config.json"), resume=True)
    trained = load_checkpoint(Run(run).latest_checkpoint())
    assert trained["step"] == 1
    assert all(torch.equal(v, trained["text_encoder"][k]) for k, v in pretrained.items())


def test_resume_without_a_checkpoint_starts_the_gan_training(shapes, tmp_path, monkeypatch):
    """Killed before the first checkpoint: the rows it logged go, training starts over."""
    run = tmp_path / "run"
    config = settings(shapes, run, max_steps=3)
    with monkeypatch.context() as patch:
        patch.setattr(run_module, "save_atomically", _raise(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            train(config=config)
    assert Run(run).latest_checkpoint() is None
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    train(config=config, resume=True)
    assert [row["step"] for row in _rows(run)] == [1, 2, 3]
    assert load_checkpoint(Run(run).latest_checkpoint())["step"] == 3


def test_resume_rewrites_the_config_and_says_where_training_stops(shapes, tmp_path):
    run = tmp_path / "run"
    train(config=settings(shapes, run))
    # 1 epoch is 5 steps: --max-steps 9 lies beyond it, and training says so.
    result = invoke("train", "--resume", run, "--epochs", 1, "--max-steps", 9)
    assert result.exit_code == 0, result.output
    assert (f"{run}: training stops at step 5, the end of --epochs 1 (5 steps each), before "
            "--max-steps 9; pass --epochs 2 to reach it") in result.output
    assert saved(run)["epochs"] == 1 and saved(run)["max_steps"] == 9
    assert load_checkpoint(Run(run).latest_checkpoint())["step"] == 5
    again = invoke("train", "--resume", run)
    assert again.exit_code == 0, again.output
    assert f"{run}: already at step 5 of 5; nothing to train" in again.output


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint_and_resume_goes_on(
        shapes, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "t2i_fast", "train", "--data", str(shapes), "--run",
               str(run), "--preset", "small", "--batch-size", "8", "--epochs", "100",
               "--log-every", "1", "--sample-every", "1000", "--checkpoint-every", "1000",
               "--loader-threads", "1", "--train-text-encoder"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=tempfile.gettempdir(),
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").exists() and _rows(run)):
            assert process.poll() is None and time.monotonic() < deadline, \
                process.stderr.read()[-2000:]
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    step = load_checkpoint(Run(run).latest_checkpoint())["step"]
    assert last == (f"{run}: stopped by SIGTERM at step {step}, checkpoint written; continue "
                    f"with: t2i-fast train --resume {run}")
    assert [row["step"] for row in _rows(run)] == list(range(1, step + 1))
    assert list((run / "checkpoints").iterdir()) == [Run(run).latest_checkpoint()]
    result = invoke("train", "--resume", run, "--max-steps", step + 2)
    assert result.exit_code == 0, result.output
    assert load_checkpoint(Run(run).latest_checkpoint())["step"] == step + 2
    assert [row["step"] for row in _rows(run)] == list(range(1, step + 3))


def test_a_second_signal_stops_at_once():
    stop = StopSignals()
    with pytest.raises(TrainingStopped, match="SIGINT at once"):
        stop.handle(signal.SIGINT, None)  # outside the loop: at once
    with stop.deferred():
        stop.handle(signal.SIGTERM, None)
        assert stop.received == signal.SIGTERM
        with pytest.raises(TrainingStopped, match="SIGINT at once") as second:
            stop.handle(signal.SIGINT, None)
    assert second.value.exit_code == 130 and second.value.step is None


# --- train: a full disk ------------------------------------------------------------------------


def test_a_full_disk_keeps_the_last_checkpoint(shapes, tmp_path, monkeypatch):
    run = tmp_path / "run"
    config = settings(shapes, run, checkpoint_every=1)
    train(config=config)
    first = Run(run).latest_checkpoint()
    before = first.read_bytes()
    stale = run / "checkpoints" / "step_00000007.pt.tmp"  # of an earlier killed save
    stale.write_bytes(b"cut short")

    def full(obj, file):
        file.write(b"part of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(atomic.torch, "save", full)
        result = invoke("train", "--resume", run, "--max-steps", 2)
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {run}/checkpoints/step_00000002.pt: no space left on device")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [first.name]
    assert first.read_bytes() == before, "keep_checkpoints=1: the old one was not pruned"
    assert invoke("train", "--resume", run, "--max-steps", 2).exit_code == 0
    assert load_checkpoint(Run(run).latest_checkpoint())["step"] == 2


def test_a_checkpoint_is_on_the_disk_before_its_name_and_before_pruning(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace, real_unlink = os.fsync, os.replace, os.unlink

    def fsync(fd):
        events.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b)[-6:])),
                                                     real_replace(a, b)))
    monkeypatch.setattr(os, "unlink", lambda p, **k: (events.append(("unlink", str(p)[-6:])),
                                                      real_unlink(p, **k)))
    Run(tmp_path).save_checkpoint(1, {"x": torch.ones(3)}, keep=1)
    events.clear()
    Run(tmp_path).save_checkpoint(2, {"x": torch.ones(3)}, keep=1)
    assert events == [("fsync", "file"), ("replace", "002.pt"), ("fsync", "dir"),
                      ("unlink", "001.pt")]


# --- prepare: a full disk, an interrupted swap, leftovers -------------------------------------


class _FullDisk:
    """An LMDB environment whose write transactions fail as LMDB reports a short write."""

    def __init__(self, env):
        self._env = env

    def begin(self, write=False):
        if write:
            raise lmdb.Error("mdb_txn_commit: Input/output error")
        return self._env.begin()

    def __getattr__(self, name):
        return getattr(self._env, name)


@pytest.mark.parametrize("free, message", [
    (0, "no space left on device (writing .s.lmdb.tmp-"),
    (1 << 40, "cannot write the dataset (mdb_txn_commit: Input/output error)"),
])
def test_prepare_on_a_full_disk(tmp_path, monkeypatch, free, message):
    out = tmp_path / "s.lmdb"
    assert invoke("prepare", "shapes", "--out", out, "--n", 4, "--image-size", 16).exit_code == 0
    real_open = writer_module.lmdb.open
    monkeypatch.setattr(writer_module.lmdb, "open", lambda *a, **k: _FullDisk(real_open(*a, **k)))
    monkeypatch.setattr(writer_module.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(1 << 41, (1 << 41) - free, free))
    result = invoke("prepare", "shapes", "--out", out, "--n", 6, "--image-size", 16,
                    "--overwrite")
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"Error: {out}: {message}"), line
    monkeypatch.undo()
    with Dataset(out) as ds:
        assert len(ds) == 4, "the old dataset is untouched"
    assert [p.name for p in tmp_path.iterdir()] == ["s.lmdb"]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "backup"])
def test_an_overwrite_cut_short_keeps_a_whole_dataset_under_the_name(tmp_path, monkeypatch,
                                                                     exchange):
    out = tmp_path / "s.lmdb"
    assert invoke("prepare", "shapes", "--out", out, "--n", 4, "--image-size", 16).exit_code == 0
    if not exchange:
        monkeypatch.setattr(writer_module, "_exchange", lambda a, b: False)
    swapped = []
    real_replace, real_exchange = os.replace, writer_module._exchange

    def replace(a, b):  # the backup path: cut short between its two renames
        if str(b) == str(out) and ".tmp-" in str(a):
            assert not out.exists() and (tmp_path / ".s.lmdb.old").is_dir()
            raise KeyboardInterrupt
        real_replace(a, b)

    def exchanged(a, b):  # the exchange: cut short right after it
        swapped.append(real_exchange(a, b))
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_module.os, "replace", replace)
    if exchange:
        monkeypatch.setattr(writer_module, "_exchange", exchanged)
    with pytest.raises(KeyboardInterrupt):
        make_shapes(out=out, n=6, image_size=16, overwrite=True)
    monkeypatch.undo()
    assert swapped == ([True] if exchange else [])
    with Dataset(out) as ds:
        assert len(ds) == (6 if exchange else 4)
    assert [p.name for p in tmp_path.iterdir()] == ["s.lmdb"]


def test_a_writer_recovers_what_a_killed_one_left(tmp_path):
    out = tmp_path / "s.lmdb"
    assert invoke("prepare", "shapes", "--out", out, "--n", 4, "--image-size", 16).exit_code == 0
    # Killed between renaming the old dataset to its backup and the new one into place.
    os.replace(out, tmp_path / ".s.lmdb.old")
    dead = tmp_path / ".s.lmdb.tmp-dead0000"  # a killed writer's temporary
    dead.mkdir()
    (dead / "data.mdb").write_bytes(b"partial")
    live = tmp_path / ".s.lmdb.tmp-live0000"  # a running writer's: locked
    live.mkdir()
    lock = os.open(live, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        result = invoke("prepare", "shapes", "--out", out, "--n", 6, "--image-size", 16)
        assert result.exit_code == 1 and "already exists (pass --overwrite" in result.output
        with Dataset(out) as ds:
            assert len(ds) == 4, "the old dataset is back under its name"
        assert sorted(p.name for p in tmp_path.iterdir()) == [".s.lmdb.tmp-live0000",
                                                              "s.lmdb"]
    finally:
        os.close(lock)


def _raise(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc
    return fail


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if line.strip()]


def test_under_ddp_a_signal_to_one_process_stops_both_at_one_step(shapes, tmp_path):
    """Process 1 alone gets SIGTERM during step 3: both stop after it, at a logged step,
    rank 0 writing the checkpoint first; neither waits for the other forever."""
    run = tmp_path / "run"
    config = settings(shapes, run, max_steps=None, epochs=100, log_every=2,
                      checkpoint_every=100)
    context = torch.multiprocessing.spawn(
        signalled_run, args=(str(tmp_path / "store"), config, 1, 3), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the processes did not stop")
    assert [(tmp_path / f"stopped-{rank}").read_text() for rank in (0, 1)] == ["4", "4"]
    assert load_checkpoint(Run(run).latest_checkpoint())["step"] == 4
