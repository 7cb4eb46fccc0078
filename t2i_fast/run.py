"""A run folder, the one place that knows its layout. ``train`` writes it, and every command
that reads a run (sample, eval, style, report) reaches its files through ``Run``:

    config.json                    the resolved TrainConfig, written first
    checkpoints/step_NNNNNNNN.pt   the newest few, each whole or absent
    metrics.jsonl                  a row per logged step
    samples/step_NNNNNNNN.png      the fixed-caption grid over training; samples.png the latest
    loss_curves.png
    tensorboard/                   with --tensorboard: the metrics and sample grids as events
    fused_layers.json              the engine's kernel choices (fused layers, loss) and why
    text/                          its own text pretraining (a ``TextEncoderFolder``)
    style_encoder.pt               the style encoder, with style_metrics.jsonl
    eval_NAME.json                 evaluation results saved by the user

The folder ``pretrain-text --out`` makes (and a run's ``text/``) is a ``TextEncoderFolder``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from t2i_fast.atomic import TMP_SUFFIX, save_atomically, write_text_atomically
from t2i_fast.config import TrainConfig
from t2i_fast.errors import T2IError

_STEP_FILE = re.compile(r"step_(\d{8})\.(?:pt|png)$")
_EVALUATION = re.compile(r"eval_(.+)\.json$")


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines log, each a JSON object; none when it is absent. A last row
    cut short (the process killed while writing it) is left out."""
    if not path.is_file():
        return []
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise T2IError(f"{path}: cannot read ({exc})") from exc
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError as exc:
            if number == len(lines):
                break
            raise T2IError(f"{path}: line {number} is not a JSON row ({exc})") from exc
        if not isinstance(row, dict):
            raise T2IError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


@contextmanager
def jsonl_writer(path: Path, *, append: bool) -> Iterator[JsonlWriter]:
    """A JSON-lines log opened to add rows (``append``) or to start afresh."""
    with path.open("a" if append else "w") as file:
        yield JsonlWriter(file)


class JsonlWriter:
    def __init__(self, file: TextIO):
        self._file = file

    def write(self, row: dict) -> None:
        """One row, on the disk's side of Python's buffer before the next step runs."""
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()


def _read_json_object(path: Path, what: str) -> dict:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise T2IError(f"{path}: cannot read {what} ({exc})") from exc
    if not isinstance(values, dict):
        raise T2IError(f"{path}: not {what} (a JSON object)")
    return values


def step_of(path: Path) -> int:
    """The step of a checkpoint or sample grid file (step_NNNNNNNN.pt or .png)."""
    return int(_STEP_FILE.search(path.name).group(1))


class TextEncoderFolder:
    """What ``pretrain-text`` writes: config.json, metrics.jsonl, evaluation.json and, last,
    text_encoder.pt (so its presence means the pretraining finished); with ``--tensorboard``,
    the metrics as events in tensorboard/."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.config = self.root / "config.json"
        self.metrics = self.root / "metrics.jsonl"
        self.evaluation = self.root / "evaluation.json"
        self.encoder = self.root / "text_encoder.pt"
        self.tensorboard = self.root / "tensorboard"

    def finished(self) -> bool:
        return self.encoder.is_file()

    def read_evaluation(self) -> dict:
        return _read_json_object(self.evaluation, "the pretraining's evaluation")


class Run:
    """A run folder (``root``); one of its checkpoints is ``checkpoint()``: the file it was
    opened at, else the newest."""

    def __init__(self, root: str | Path, *, checkpoint: Path | None = None):
        self.root = Path(root)
        self._chosen = checkpoint
        self.config_file = self.root / "config.json"
        self.checkpoints_dir = self.root / "checkpoints"
        self.metrics_file = self.root / "metrics.jsonl"
        self.samples_dir = self.root / "samples"
        self.latest_samples = self.root / "samples.png"
        self.loss_curves = self.root / "loss_curves.png"
        self.tensorboard = self.root / "tensorboard"
        self.fusion_evidence = self.root / "fused_layers.json"
        self.text = TextEncoderFolder(self.root / "text")
        self.style_encoder = self.root / "style_encoder.pt"
        self.style_metrics = self.root / "style_metrics.jsonl"
        # What 't2i-fast style-transfer --out' saves there; the report shows it.
        self.style_transfer_picture = self.root / "style_transfer.png"
        self.report = self.root / "report.html"

    @classmethod
    def at(cls, path: str | Path) -> Run:
        """The run of a run folder, or of a checkpoint file (RUN/checkpoints/step_*.pt),
        opened at that checkpoint."""
        path = Path(path)
        if path.is_dir():
            return cls(path)
        if path.is_file():
            return cls(path.parent.parent, checkpoint=path)
        raise T2IError(f"{path}: neither a run folder nor a checkpoint file")

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r})"

    # -- configuration ------------------------------------------------------------------------
    def is_run(self) -> bool:
        """Whether training has begun here: config.json is written first."""
        return self.config_file.is_file()

    def config(self) -> TrainConfig:
        return TrainConfig.load(self.config_file)

    def save_config(self, config: TrainConfig) -> None:
        config.save(self.config_file)

    # -- checkpoints --------------------------------------------------------------------------
    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints_dir / f"step_{step:08d}.pt"

    def checkpoints(self) -> list[Path]:
        """The whole checkpoints, oldest first (a save cut short leaves only a temporary)."""
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoints_dir.glob("step_*.pt")
                      if _STEP_FILE.search(p.name))

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def checkpoint(self) -> Path:
        """The checkpoint this run was opened at, else its newest."""
        found = self._chosen or self.latest_checkpoint()
        if found is None or not found.is_file():
            raise T2IError(f"{self._chosen or self.root}: no checkpoint (a run folder or a "
                           "step_*.pt file)")
        return found

    def save_checkpoint(self, step: int, state: dict, *, keep: int) -> Path:
        """Writes step ``step``'s checkpoint, then deletes all but the newest ``keep``: only
        once the new one is whole on the disk, so a failed save (a full disk) leaves the older
        ones as they were, and the newest complete one is never deleted."""
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        path = save_atomically(state, self.checkpoint_path(step))
        for old in self.checkpoints()[:-keep]:
            old.unlink()
        return path

    def remove_partial_checkpoints(self) -> None:
        """Deletes the temporaries of saves that a kill cut short."""
        for partial in self.checkpoints_dir.glob(f"step_*.pt{TMP_SUFFIX}"):
            partial.unlink(missing_ok=True)

    # -- metrics ------------------------------------------------------------------------------
    def metrics(self) -> list[dict]:
        """The logged rows, each with its step; a last row cut short is left out."""
        rows = read_jsonl(self.metrics_file)
        for number, row in enumerate(rows, 1):
            if type(row.get("step")) is not int:
                raise T2IError(f"{self.metrics_file}: line {number} has no integer step")
        return rows

    def trim_metrics(self, step: int) -> list[dict]:
        """Drops the rows logged after ``step`` (the checkpoint resumed from, whose run logs
        them again); returns the rows kept."""
        rows = [row for row in self.metrics() if row["step"] <= step]
        write_text_atomically(self.metrics_file,
                              "".join(json.dumps(row) + "\n" for row in rows))
        return rows

    def metrics_writer(self):
        """metrics.jsonl opened to add rows."""
        return jsonl_writer(self.metrics_file, append=True)

    # -- pictures -----------------------------------------------------------------------------
    def sample_grid_path(self, step: int) -> Path:
        return self.samples_dir / f"step_{step:08d}.png"

    def sample_grids(self) -> list[tuple[int, Path]]:
        """(step, picture) of each sample grid, in the order of training."""
        if not self.samples_dir.is_dir():
            return []
        return sorted((step_of(p), p) for p in self.samples_dir.glob("step_*.png")
                      if _STEP_FILE.search(p.name))

    # -- encoders -----------------------------------------------------------------------------
    def pretrained_encoders(self) -> Path | None:
        """The pretrain-text checkpoint the run trained with: its config's text_encoder, or
        its own text/text_encoder.pt where the folder has moved since; None without one."""
        named = self.config().text_encoder
        for path in (Path(named) if named else None, self.text.encoder):
            if path is not None and path.is_file():
                return path
        return None

    # -- evaluation results -------------------------------------------------------------------
    def evaluation_path(self, name: str) -> Path:
        """Where ``t2i-fast eval NAME --json`` output is kept in the run."""
        return self.root / f"eval_{name}.json"

    def evaluations(self) -> list[tuple[str, dict]]:
        """(file name relative to the run, results) of each evaluation saved in the run
        (eval_NAME.json, by name), then of its own text pretraining."""
        found = sorted(p for p in self.root.glob("eval_*.json") if _EVALUATION.search(p.name))
        if self.text.evaluation.is_file():
            found.append(self.text.evaluation)
        return [(str(path.relative_to(self.root)), _read_json_object(path, "evaluation results"))
                for path in found]
