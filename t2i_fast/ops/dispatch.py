"""The measured dispatch: a JSON table of decisions an op made by timing its candidate
implementations on this GPU, so that each is measured once and reused by every process.

The table (``~/.cache/t2i_fast/dispatch.json``, or ``$T2I_FAST_DISPATCH``) maps a key (the
GPU, torch and Triton versions, then the op's own fields: ``key``) to the op's entry (what
it chose, and the timings behind it). Ops decide what to measure; ``fastest`` times
candidates against a reference the same way for all of them.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import triton
from triton.runtime.errors import OutOfResources


def dispatch_file() -> Path:
    """Where the ops record their measured decisions."""
    env = os.environ.get("T2I_FAST_DISPATCH")
    return Path(env) if env else Path.home() / ".cache" / "t2i_fast" / "dispatch.json"


_TABLES: dict[Path, dict[str, dict]] = {}


def _read_table(path: Path) -> dict[str, dict]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError:
        warnings.warn(f"{path} is not valid JSON; its dispatch decisions are measured again",
                      stacklevel=3)
        return {}


def dispatch_table() -> dict[str, dict]:
    """The recorded decisions: {key: the op's entry}, read once per process and file."""
    path = dispatch_file()
    if path not in _TABLES:
        _TABLES[path] = _read_table(path)
    return _TABLES[path]


def record(key: str, entry: dict) -> None:
    """Records ``entry`` under ``key`` (replacing an earlier one) in the file and in this
    process's table."""
    path = dispatch_file()
    table = _read_table(path)  # keep what other processes recorded meanwhile
    table[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)  # readers see the old table or the new one, never half of one
    _TABLES[path] = table


def key(device: torch.device, *fields: str) -> str:
    """The table key of a decision on ``device`` (a GPU) described by the op's ``fields``."""
    return " | ".join([torch.cuda.get_device_name(device), f"torch {torch.__version__}",
                       f"triton {triton.__version__}", *fields])


def _scaled_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1.0))


def fastest(run: Callable[[str], torch.Tensor], candidates: list[str], *, reference: str,
            tolerance: float) -> tuple[str, dict[str, float], dict[str, float]]:
    """Times ``run(name)`` (``triton.testing.do_bench``, median ms) for ``reference`` and each
    candidate whose output agrees with the reference's (max error scaled by the reference's
    largest magnitude, at most 1, within ``tolerance``); a candidate too large for this GPU's
    shared memory is left out. Returns (the fastest's name, {name: ms} of those timed,
    {name: error} of those that disagreed)."""
    from triton.testing import do_bench

    def bench(name: str) -> float:
        return round(float(do_bench(lambda: run(name), warmup=10, rep=40,
                                    return_mode="median")), 5)

    expected = run(reference)
    ms = {reference: bench(reference)}
    best, disagreed = reference, {}
    for name in candidates:
        try:
            error = _scaled_error(run(name), expected)
        except OutOfResources:
            continue
        if error > tolerance:
            disagreed[name] = error
            continue
        ms[name] = bench(name)
        if ms[name] < ms[best]:
            best = name
    return best, ms, disagreed
