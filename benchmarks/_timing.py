"""Timing helpers for the benchmarks: medians of repeated batches, never a single run."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable


def median_per_call(fn: Callable[[], object], *, calls: int, repeats: int = 7) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` batches of ``calls`` calls."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def machine() -> str:
    """One line naming the machine the figures come from."""
    return f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} cores"
