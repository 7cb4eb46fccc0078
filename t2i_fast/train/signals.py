"""Stopping training on SIGTERM or SIGINT (a job scheduler's time limit, ``kill``, Ctrl-C).

Inside the training loop the first signal asks it to stop at the next step boundary, where
it writes a checkpoint that ``--resume`` continues from; a second one stops at once. Before
the loop (making the run, pretraining the text encoder) there is no step to finish, and a
signal stops at once: the run folder and its config.json stay, and ``--resume`` starts the
unfinished stage again."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(KeyboardInterrupt):
    """Training stopped by signal ``signum``: at step ``step`` with a checkpoint of it, or
    (``step`` None) at once, where the run's last checkpoint, if any, is where it resumes.
    A KeyboardInterrupt, so that ``except Exception`` does not swallow it."""

    def __init__(self, signum: int, *, step: int | None = None):
        self.signum, self.step = signum, step
        when = f"at step {step}, checkpoint written" if step is not None else "at once"
        super().__init__(f"stopped by {signal.Signals(signum).name} {when}")

    @property
    def exit_code(self) -> int:
        """The shell's status for a process ended by the signal."""
        return 128 + self.signum


class StopSignals:
    """What the handlers have seen: ``received`` is the first signal's number, set instead
    of stopping while inside ``deferred()``."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._deferring = False

    def handle(self, signum: int, frame) -> None:
        if self._deferring and self.received is None:
            self.received = signum
            return
        raise TrainingStopped(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[StopSignals]:
        """Within: a first signal only sets ``received``, for the loop to act on."""
        self._deferring = True
        try:
            yield self
        finally:
            self._deferring = False


@contextlib.contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """SIGTERM and SIGINT handled by a StopSignals while inside; the previous handlers after.
    Only the main thread may set handlers: elsewhere (a program running training in a thread
    of its own) the process's handlers are left alone and ``received`` stays None."""
    stop = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {signum: signal.signal(signum, stop.handle) for signum in SIGNALS}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
