"""The measured dispatch: a JSON table of decisions an op made by timing its candidate
implementations on this GPU, so that each is measured once and reused by every process.

The table (``~/.cache/t2i_fast/dispatch.json``, or ``$T2I_FAST_DISPATCH``) maps a key (the
GPU, torch and Triton versions, then the op's own fields: ``key``) to the op's entry (what
it chose, and the timings behind it). Ops decide what to measure; ``measured_choice`` checks
and times their candidates the same way for all of them: each candidate is a step (one
training forward and backward of a layer, say) timed by a ``Timer``, by default
``graph_replay_ms``: inside CUDA-graph replay, as the engine's captured step runs it, where
launch overhead, which dominates a layer of a tenth of a millisecond timed call by call from
Python, is gone. Tests inject a timer of their own: on the CPU there are no CUDA graphs.
"""

from __future__ import annotations

import json
import os
import statistics
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import triton


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
    """The table key of a decision on ``device`` described by the op's ``fields``: the GPU's
    name, or "cpu" (the interpreter, where only tests with a timer of their own measure)."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return " | ".join([name, f"torch {torch.__version__}", f"triton {triton.__version__}",
                       *fields])


def _scaled_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1.0))


# timer(key, candidate name, step) → milliseconds of several runs of step.
Timer = Callable[[str, str, Callable[[], object]], list[float]]


def graph_replay_ms(key: str, name: str, step: Callable[[], object], *, replays: int = 15,
                    inner: int = 4, warmup: int = 3) -> list[float]:
    """Milliseconds per run of ``step``, one sample per replay of a CUDA graph that captured
    ``inner`` runs of it (CUDA events around each replay): the step as a captured training
    step runs it, without Python or launch overhead. Warm-up runs (compiling, cuDNN's and
    cuBLAS's workspaces) happen on a side stream before the capture, as capture requires.
    ``key`` and ``name`` are for timers that need them."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            step()
    graph.replay()  # the first replay pays for uploading the graph
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(replays)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / inner for start, end in events]


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def measured_choice(key: str, make_candidates: Callable[[], dict[str, Callable[[], tuple]]],
                    *, reference: str, tolerance: float, timer: Timer) -> dict:
    """The table's entry under ``key``; on a miss, measured once and recorded.

    ``make_candidates()`` (called on a miss only) gives {name: step}, each step returning a
    tuple of tensors whose first is the output the candidates must agree on: its max error
    against ``reference``'s, scaled by the reference's largest magnitude (at most 1), within
    ``tolerance``. Each agreeing candidate is timed by ``timer`` and represented by the
    median of its samples. The entry: {"winner": the fastest's name, "ms": {name: median ms}
    of those timed, "samples": how many each, "timer": its name}, with "disagreed" {name:
    error} and "failed" {name: why} when some candidates were left out (a tiling too large
    for this GPU's shared memory, say)."""
    entry = dispatch_table().get(key)
    if entry is not None:
        return entry
    candidates = make_candidates()
    expected = candidates[reference]()[0]
    ms, samples, disagreed, failed = {}, {}, {}, {}
    for name, step in candidates.items():
        try:
            if name != reference:
                error = _scaled_error(step()[0], expected)
                if error > tolerance:
                    disagreed[name] = error
                    continue
            times = timer(key, name, step)
        except Exception as exc:  # noqa: BLE001 — one candidate failing leaves the others
            if name == reference:
                raise
            failed[name] = _first_line(exc)
            continue
        ms[name] = round(float(statistics.median(times)), 5)
        samples[name] = len(times)
    entry = {"winner": min(ms, key=ms.get), "ms": ms, "samples": samples,
             "timer": getattr(timer, "__name__", type(timer).__name__)}
    if disagreed:
        entry["disagreed"] = disagreed
        warnings.warn(f"{key}: candidates disagreed with {reference} (scaled max error "
                      f"{disagreed}); they are not used", stacklevel=2)
    if failed:
        entry["failed"] = failed
    record(key, entry)
    return entry
