"""Checkpoints: written atomically (a temporary file renamed into place), the last N kept."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from t2i_fast.errors import T2IError

_NAME = re.compile(r"step_(\d{8})\.pt$")


def checkpoint_dir(run: Path) -> Path:
    return run / "checkpoints"


def save_checkpoint(run: Path, step: int, state: dict, *, keep: int) -> Path:
    folder = checkpoint_dir(run)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in sorted(folder.glob("step_*.pt"))[:-keep]:
        old.unlink()
    return path


def latest_checkpoint(run: Path) -> Path | None:
    found = sorted(p for p in checkpoint_dir(run).glob("step_*.pt") if _NAME.search(p.name))
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file
        raise T2IError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
