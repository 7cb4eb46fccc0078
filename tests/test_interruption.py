"""Datasets that survive interruption: a full disk in `prepare`, and `prepare --overwrite`
cut short mid-swap. Each ends in a state that the next command continues from, with nothing
half-written left."""

import fcntl
import os
import shutil

import lmdb
import pytest
from click.testing import CliRunner

from t2i_fast.cli import main
from t2i_fast.data import Dataset
from t2i_fast.data import writer as writer_module
from t2i_fast.prepare.shapes import make_shapes


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


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
