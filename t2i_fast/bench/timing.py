"""The benchmarks' clocks and ceilings, one definition for every script in ``scripts/``:
medians of CUDA-event timings (``triton.testing.do_bench``) on a GPU, of wall-clock calls on
the CPU, and the card's matmul rate measured in the same run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def wall_ms(fn: Callable[[], object], *, reps: int, warmup: int = 0) -> float:
    """Median wall-clock milliseconds of ``reps`` calls of ``fn``, after ``warmup`` untimed
    ones (the CPU's clock: no events to time there)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        tick = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - tick))
    return statistics.median(times)


def cuda_ms(fn: Callable[[], object], *, warmup: int = 25) -> float:
    """Median milliseconds of ``fn`` on the GPU (CUDA events), launch overhead included."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=100, return_mode="median"))


def matmul_tflops(dtype: torch.dtype) -> float:
    """This card's TFLOP/s for an 8192² matmul in ``dtype`` (fp32: TF32 as torch is set):
    the ceiling a row of that precision is set against."""
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    return 2 * n**3 / cuda_ms(lambda: a @ b) / 1e9
