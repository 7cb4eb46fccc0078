"""The body of each process that tests/test_distributed.py starts with
torch.multiprocessing: a module importable by its own name in those processes."""

import contextlib
import os
import sys
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch

from t2i_fast.train import TrainConfig, train


@contextlib.contextmanager
def gloo_world(store: str, rank: int) -> Iterator[None]:
    """A gloo group of two started by the caller, as a program running `train` would;
    destroyed on the way out, and every process group it had must then be gone: one left
    alive (DDP or a module's defaults holding it) keeps its gloo threads to interpreter
    exit, where one of them aborted a process ("terminate called without an active
    exception")."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=2)
    try:
        yield
    finally:
        groups = [weakref.ref(g) for g in torch.distributed.distributed_c10d._world.pg_map]
        torch.distributed.destroy_process_group()
    alive = [g() for g in groups if g() is not None]
    assert not alive, f"rank {rank}: {len(alive)} process groups outlived destroy_process_group"


def watched_run(rank: int, store: str, config: TrainConfig, backend: str) -> None:
    """One of two processes (torch.multiprocessing): trains ``config`` with the gloo
    backend and fails if this process, not being rank 0, writes anything under the run's
    folder, or if a part of the compiled engine fell back to eager."""
    torch.set_num_threads(1)
    watched = str(Path(config.run).parent)
    writes = []

    def audit(event, args):
        if event == "open" and str(args[0]).startswith(watched):
            mode, flags = args[1], args[2]
            if (mode and set(mode) & set("wax+")) or (mode is None and flags & (
                    os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                writes.append((event, str(args[0])))
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree") \
                and str(args[0]).startswith(watched):
            writes.append((event, str(args[0])))

    if backend == "compiled":
        # Dynamo and AOTAutograd as on a GPU, without Inductor's compile time.
        compile_ = torch.compile
        torch.compile = lambda fn, **options: compile_(fn, backend="aot_eager", **options)
    with gloo_world(store, rank):
        sys.addaudithook(audit)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(config=config)
    failed = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    assert not failed, failed
    assert rank == 0 or not writes, f"rank {rank} wrote {writes}"
    assert rank != 0 or writes, "the watch saw nothing"


def signalled_run(rank: int, store: str, config: TrainConfig, signalled: int, at: int) -> None:
    """One of two processes (torch.multiprocessing): trains ``config``; process
    ``signalled`` alone sends itself SIGTERM during step ``at``. Writes the step it
    stopped at into RUN/../stopped-RANK."""
    import signal

    from t2i_fast.train.loop import Trainer
    from t2i_fast.train.signals import TrainingStopped

    torch.set_num_threads(1)
    step = Trainer.train_step

    def train_step(self, batch):
        if rank == signalled and self.step == at - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch)

    Trainer.train_step = train_step
    with gloo_world(store, rank):
        try:
            train(config=config)
            stopped = "finished"
        except TrainingStopped as exc:
            stopped = str(exc.step)
    (Path(config.run).parent / f"stopped-{rank}").write_text(stopped)
