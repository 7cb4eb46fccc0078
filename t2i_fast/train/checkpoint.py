"""Checkpoints: written atomically (a temporary file flushed to the disk, then renamed into
place), the last N kept."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from t2i_fast.atomic import TMP_SUFFIX, save_atomically
from t2i_fast.errors import T2IError

_NAME = re.compile(r"step_(\d{8})\.pt$")


def checkpoint_dir(run: Path) -> Path:
    return run / "checkpoints"


def save_checkpoint(run: Path, step: int, state: dict, *, keep: int) -> Path:
    """Writes step ``step``'s checkpoint, then deletes all but the newest ``keep``: only
    once the new one is whole on the disk, so a failed save (a full disk) leaves the older
    ones as they were, and the newest complete one is never deleted."""
    folder = checkpoint_dir(run)
    folder.mkdir(parents=True, exist_ok=True)
    path = save_atomically(state, folder / f"step_{step:08d}.pt")
    for old in _complete(folder)[:-keep]:
        old.unlink()
    return path


def remove_partial_checkpoints(run: Path) -> None:
    """Deletes the temporaries of saves that a kill cut short."""
    for partial in checkpoint_dir(run).glob(f"step_*.pt{TMP_SUFFIX}"):
        partial.unlink(missing_ok=True)


def _complete(folder: Path) -> list[Path]:
    """The checkpoints in ``folder``, oldest first."""
    return sorted(p for p in folder.glob("step_*.pt") if _NAME.search(p.name))


def latest_checkpoint(run: Path) -> Path | None:
    found = _complete(checkpoint_dir(run))
    return found[-1] if found else None


def load_checkpoint(path: str | Path, *, keys: tuple[str, ...] = (),
                    kind: str = "checkpoint") -> dict:
    """The dict a project file holds (training checkpoints, text and style encoders, network
    weights), read with ``weights_only``: tensors, numbers, strings, lists, tuples and dicts
    only, so a forged file cannot run code on load. It must hold ``keys``; ``kind`` names
    what the file should be in the errors."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is a page of advice around one line of cause.
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed|$)",
                           str(exc), re.MULTILINE)
        raise T2IError(f"{path}: refused: it holds something other than tensors, numbers, "
                       "strings, lists and dicts, and reading more could run code"
                       + (f" ({reason.group(1).strip()})" if reason else "")) from exc
    except Exception as exc:  # torch raises many types for a damaged file
        first = str(exc).strip().splitlines()[:1]
        raise T2IError(f"{path}: cannot read {kind} ({type(exc).__name__}"
                       + (f": {first[0]}" if first else "") + ")") from exc
    if not isinstance(state, dict):
        raise T2IError(f"{path}: not a {kind} (holds a {type(state).__name__}, not a dict)")
    missing = [key for key in keys if key not in state]
    if missing:
        raise T2IError(f"{path}: not a {kind}: no {', '.join(map(repr, missing))} in it")
    return state
