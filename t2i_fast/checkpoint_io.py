"""Reading the project's torch files (training checkpoints, text and style encoders, network
weights) without running code: what a forged file can hold is refused, and a damaged or
wrong one ends in one error naming it. Writing them is ``atomic.save_atomically``."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from t2i_fast.errors import T2IError


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
