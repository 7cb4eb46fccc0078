"""TensorBoard events beside the JSON-lines logs (``--tensorboard``): each logged row's numbers
as scalars at its step, and each sample grid as an image. The JSONL files stay the record;
the events are a view of them for ``tensorboard --logdir``. torch's own SummaryWriter writes
them, and it needs the ``tensorboard`` package, an optional extra: it is imported only when
asked for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from t2i_fast.config import FieldError

INSTALL = "pip install 't2i-fast[tensorboard]'"


def _summary_writer_class() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise FieldError("tensorboard", f"needs the tensorboard package, which does not import "
                                        f"here ({exc}): {INSTALL}") from exc
    return SummaryWriter


def require_tensorboard() -> None:
    """Fails with one error saying how to install TensorBoard where it does not import: called
    before anything is written."""
    _summary_writer_class()


class EventLog:
    """Event files in ``folder``. ``purge_step``: a run resumed from the checkpoint before it
    (its last step + 1), whose earlier events at and after it TensorBoard then drops, as the
    run logs those steps again; None for a new run."""

    def __init__(self, folder: Path, *, purge_step: int | None = None):
        self._writer = _summary_writer_class()(log_dir=str(folder), purge_step=purge_step)

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def scalars(self, row: dict, *, step_key: str) -> None:
        """Every number of a logged ``row`` under its key, at the step ``row[step_key]``."""
        for key, value in row.items():
            if key != step_key and type(value) in (int, float):
                self._writer.add_scalar(key, value, global_step=row[step_key])

    def image(self, tag: str, path: Path, *, step: int) -> None:
        """A picture file, as it was saved, then flushed with everything before it."""
        with Image.open(path) as picture:
            pixels = np.asarray(picture.convert("RGB"))  # [H, W, 3]
        self._writer.add_image(tag, pixels, global_step=step, dataformats="HWC")
        self.flush()

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
