"""Training on several processes (torch.distributed), on the CPU: two processes with the gloo
backend, launched by torchrun as a user would (``python -m torch.distributed.run
--nproc-per-node 2 -m t2i_fast -- train ...``) or by torch.multiprocessing where a test must
watch inside each process. Every run here is the small preset at a global batch of 8 on a
40-image shapes dataset (5 batches an epoch), a few steps long.

What a GPU is needed for (NCCL, SyncBatchNorm's CUDA kernels, DDP inside a captured CUDA
graph) is not tested here; docs/distributed.md says so.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

# A module of its own: the spawned processes import it by this top-level name (tests/ is
# on the path), where this test module's package-qualified name would not import.
from distributed_worker import watched_run  # noqa: E402

from t2i_fast.checkpoint_io import load_checkpoint
from t2i_fast.data import Loader
from t2i_fast.errors import T2IError
from t2i_fast.prepare.shapes import make_shapes
from t2i_fast.run import Run
from t2i_fast.train import TrainConfig, train
from t2i_fast.train.distributed import World
from t2i_fast.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
NETWORKS = ("G", "D", "G_ema", "text_encoder")


def settings(shapes, run, **changes) -> TrainConfig:
    """GAN-INT-CLS with the text encoder trained with D: every part that DDP wraps, with
    the small preset's class loss. The learning rate halves each epoch, so that the schedule
    shows in the metrics; D's is G's, as the bounds below were measured: the small preset's
    4 times larger D steps amplify float32 rounding to 1.3% in d_fake by the fourth step."""
    base = TrainConfig(data=str(shapes), run=str(run), preset="small", batch_size=8,
                       max_steps=4, log_every=1, sample_every=100, checkpoint_every=1,
                       keep_checkpoints=8, lr_halve_every=1, loader_threads=1,
                       train_text_encoder=True, sync_bn=True, d_lr_scale=1.0)
    return dataclasses.replace(base, **changes)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def state(run: Path, step: int) -> dict:
    return load_checkpoint(Run(run).checkpoint_path(step))


def deviation(run: dict, reference: dict, init: dict) -> float:
    """‖θ - θ_ref‖ / ‖θ_ref - θ_0‖ over every float tensor of the four networks: the
    distance from the reference relative to how far training moved (tests/test_engine.py
    says why not elementwise)."""
    apart = moved = 0.0
    for net in NETWORKS:
        for key, ref in reference[net].items():
            if ref.is_floating_point():
                apart += float((run[net][key].double() - ref.double()).square().sum())
                moved += float((ref.double() - init[net][key].double()).square().sum())
    return (apart / moved) ** 0.5


@pytest.fixture(scope="module")
def one(shapes, tmp_path_factory):
    """One process, 7 steps (into the second epoch), and its networks before the first."""
    config = settings(shapes, tmp_path_factory.mktemp("one") / "run", max_steps=7)
    return {"run": train(config=config), "init": Trainer(config).state()}


def torchrun(*args) -> subprocess.CompletedProcess:
    """``t2i-fast ARGS`` in two processes. torchrun's own --run-path would take an
    abbreviated --run: the command comes after "--"."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "t2i_fast", "--", *map(str, args)]
    # Not from the checkout: there "-m t2i_fast" would import the source tree, which has no
    # built extension when the package is installed (as in CI); every path here is absolute.
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=tempfile.gettempdir())


@pytest.fixture(scope="module")
def two(shapes, tmp_path_factory):
    """Two processes, 4 steps, through torchrun and the command line."""
    run = tmp_path_factory.mktemp("two") / "run"
    done = torchrun("train", "--data", shapes, "--run", run, "--preset", "small",
                    "--batch-size", 8, "--max-steps", 4, "--log-every", 1,
                    "--sample-every", 100, "--checkpoint-every", 1, "--keep-checkpoints", 8,
                    "--lr-halve-every", 1, "--loader-threads", 1, "--train-text-encoder",
                    "--sync-bn", "--d-lr-scale", 1)  # as settings() makes it
    assert done.returncode == 0, done.stderr[-3000:]
    return {"run": run, "stdout": done.stdout}


def test_shards_are_disjoint_cover_the_epoch_and_make_the_global_batch(shapes, tmp_path):
    """Rank r of 2 at batch 4 reads samples r, r + 2, ... of the one-process batch of 8,
    each with the same crop, flip, captions and mismatched image (drawn from the whole
    dataset by record, whatever the sharding): the same global batch, split."""
    def epoch(rank, world_size, batch_size, **options):
        with Loader(shapes, batch_size=batch_size, seed=3, epoch=1, rank=rank,
                    world_size=world_size, num_threads=1, **options) as loader:
            return list(loader)

    whole = epoch(0, 1, 8)
    shards = [epoch(r, 2, 4) for r in range(2)]
    assert len(whole) == len(shards[0]) == len(shards[1]) == 5
    for b, batch in enumerate(whole):
        for r, shard in enumerate(shards):
            for name in ("indices", "wrong_indices", "images", "wrong_images", "captions"):
                assert torch.equal(getattr(shard[b], name), getattr(batch, name)[r::2]), name
    seen = [torch.cat([b.indices for b in shard]).tolist() for shard in shards]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(torch.cat([b.indices for b in whole]).tolist())
    # An odd count without drop_last: the shards still cover every record once.
    odd = tmp_path / "odd.lmdb"
    make_shapes(out=odd, n=13)
    covered = []
    for rank in range(2):
        with Loader(odd, batch_size=4, rank=rank, world_size=2, drop_last=False,
                    num_threads=1) as loader:
            covered += [i for batch in loader for i in batch.indices.tolist()]
    assert sorted(covered) == list(range(13))


def close(step: int) -> dict:
    """The tolerance of a logged metric: the first step's to float32 rounding, then 1%.
    metrics.jsonl rounds to 5 decimals, so two logged values of nearly one number may
    differ by one unit in the last place, 1e-5 (seen: 0.61686 against 0.61687, which as
    floats are 1e-5 and a little apart)."""
    return {"rel": 1e-5, "abs": 2e-5} if step == 0 else {"rel": 1e-2}


def test_two_processes_train_as_one(one, two):
    """With --sync-bn, two processes at 4 samples each take the steps one process takes at
    8: the same data, noise, BatchNorm statistics, GAN-INT mixing and averaged gradients.
    Only float32 rounding differs (sums in another order), so the first step's losses, taken
    before any update, agree to 1e-5. Adam's first update is ±lr wherever a gradient is not
    exactly 0, so weights whose gradient is rounding noise may move 2·lr apart, and from
    there the GAN's two networks feed such differences back: after one step the networks
    are 0.04% of the update apart (measured), after four 0.2%, and the losses within 0.3%.
    Per-GPU BatchNorm (without --sync-bn), the nearest wrong thing, is 2.7% apart after
    one step and its losses up to 11%."""
    ours, theirs = rows(two["run"]), rows(one["run"])[:4]
    assert [r["step"] for r in ours] == [1, 2, 3, 4]
    assert [r["lr"] for r in ours] == [r["lr"] for r in theirs]
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for key in ("d_loss", "g_loss", "d_real", "d_wrong", "d_fake", "class_real_acc",
                    "class_fake_acc"):
            assert a[key] == pytest.approx(b[key], **close(step)), (step, key)
    assert deviation(state(two["run"], 1), state(one["run"], 1), one["init"]) < 5e-3
    assert deviation(state(two["run"], 4), state(one["run"], 4), one["init"]) < 2e-2
    for step in (1, 4):
        assert state(two["run"], step)["loader"] == state(one["run"], step)["loader"]


def test_only_rank_0_writes_in_a_torchrun_run(two):
    run = two["run"]
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints", "config.json", "fused_layers.json", "loss_curves.png", "metrics.jsonl",
        "samples", "samples.png"]
    assert len(rows(run)) == 4  # one process logged each step once
    assert two["stdout"].count("done; samples in") == 1
    assert json.loads((run / "config.json").read_text())["sync_bn"] is True
    # Bad input found by rank 0 stops every process with its one-line error.
    again = torchrun("train", "--data", run.parent / "missing.lmdb", "--run", run.parent / "x",
                     "--batch-size", 8)
    errors = [line for line in again.stderr.splitlines() if line.startswith("Error: ")]
    assert again.returncode != 0 and len(errors) == 2 and len(set(errors)) == 1
    assert "missing.lmdb: not a t2i-fast dataset" in errors[0]
    assert not (run.parent / "x").exists()


def test_resume_on_one_process_continues_a_two_process_run(one, two, tmp_path):
    """A two-process checkpoint (step 4) resumed on one process to step 7 continues the same
    schedule: the epoch position (step 5 ends epoch 0), the halved learning rate, the
    data, and the noise (every rank draws the global batch's). It ends where seven steps on
    one process end, within the rounding of test_two_processes_train_as_one."""
    run = tmp_path / "run"
    shutil.copytree(two["run"], run)
    config = dataclasses.replace(TrainConfig.load(run / "config.json"), run=str(run),
                                 max_steps=7)
    train(config=config, resume=True)
    ours, theirs = rows(run), rows(one["run"])
    assert [r["step"] for r in ours] == list(range(1, 8))
    assert [(r["epoch"], r["lr"]) for r in ours] == [(r["epoch"], r["lr"]) for r in theirs]
    assert [(r["epoch"], r["lr"]) for r in ours[4:]] == [(0, 2e-4), (1, 1e-4), (1, 1e-4)]
    for a, b in zip(ours[4:], theirs[4:], strict=True):
        for key in ("d_loss", "g_loss"):
            assert np.isfinite(a[key]) and a[key] == pytest.approx(b[key], rel=2e-2)
    last = state(run, 7)
    assert last["loader"] == state(one["run"], 7)["loader"] == {"epoch": 1, "position": 2}
    assert deviation(last, state(one["run"], 7), one["init"]) < 3e-2


def spawn(config: TrainConfig, tmp_path: Path, backend: str = "eager") -> None:
    torch.multiprocessing.spawn(watched_run, nprocs=2,
                                args=(str(tmp_path / "store"), config, backend))


def test_only_rank_0_writes_while_it_pretrains_the_text_encoder(shapes, tmp_path):
    """Per-GPU BatchNorm (the default), the text encoder pretrained first: by rank 0, into
    the run folder, while rank 1 waits for it; then rank 1 trains and writes nothing."""
    config = settings(shapes, tmp_path / "runs" / "run", max_steps=2, sync_bn=False,
                      train_text_encoder=False, pretrain_epochs=1, checkpoint_every=2,
                      sample_every=2)
    spawn(config, tmp_path)
    run = Path(config.run)
    assert (run / "text" / "text_encoder.pt").exists()
    assert [r["step"] for r in rows(run)] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002.pt"]


def test_the_compiled_engine_under_ddp(one, shapes, tmp_path):
    """The compiled backend's parts (Dynamo, AOTAutograd) inside DDP, the trial compile
    included, with --sync-bn: every part compiles, and two processes take one process's
    eager steps within the compiled-against-eager rounding of tests/test_engine.py."""
    config = settings(shapes, tmp_path / "runs" / "run", max_steps=2, backend="compiled")
    spawn(config, tmp_path, backend="compiled")
    run = Path(config.run)
    for step, (a, b) in enumerate(zip(rows(run), rows(one["run"]), strict=False)):
        for key in ("d_loss", "g_loss"):
            assert a[key] == pytest.approx(b[key], **close(step)), (step, key)
    assert deviation(state(run, 2), state(one["run"], 2), one["init"]) < 2e-2


def test_r1_under_ddp_takes_one_processs_steps(shapes, tmp_path):
    """--r1 on two processes with --sync-bn: the penalty's second backward goes through
    DDP's one wrapper of the D step and the synchronised BatchNorm, and the steps are one
    process's (the logged penalty on steps 2 and 4, the losses, within float32 rounding)."""
    alone = train(config=settings(shapes, tmp_path / "one" / "run", max_steps=4, r1=1.0,
                                  r1_every=2))
    config = settings(shapes, tmp_path / "runs" / "run", max_steps=4, r1=1.0, r1_every=2)
    spawn(config, tmp_path)
    ours, theirs = rows(Path(config.run)), rows(alone)
    assert [("r1" in r) for r in ours] == [("r1" in r) for r in theirs] == [False, True] * 2
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for key in ("d_loss", "g_loss", "r1"):
            if key in b:
                assert a[key] == pytest.approx(b[key], **close(step)), (step, key)


def test_the_global_batch_must_split_evenly():
    world = World(device=torch.device("cpu"), rank=1, size=4)
    assert world.split_batch(64) == 16
    with pytest.raises(T2IError, match="--batch-size 10 does not split evenly over 4"):
        world.split_batch(10)
    with pytest.raises(T2IError, match="BatchNorm needs at least 2"):
        world.split_batch(4)


def test_check_ddp_script_compares_a_torchrun_run_with_a_plain_one(tmp_path):
    """scripts/check_ddp.py (the GPU check's DDP stage) on the CPU: both runs finish without
    a fallback and, two --sync-bn processes against one, their first step's scores agree."""
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_ddp.py"), "--device",
                           "cpu", "--steps", "2", "--nproc", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["difference"]["steps_compared"] == 2
    assert {run["exit_code"] for run in result["runs"].values()} == {0}
    for key in ("d_real", "d_wrong"):
        assert result["difference"]["first_step"][key] < 1e-4, result["difference"]
    assert "largest relative difference over 2 steps" in done.stdout
