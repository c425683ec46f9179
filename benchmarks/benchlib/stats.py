"""Timing with warm-ups and repeats, and the numbers that summarise it.

One number per measurement hides noise. Each summary therefore carries, next to the median (robust to
a stray slow call), the fastest and the 90th-percentile call and a relative spread, so a reader can
tell a quiet measurement from a disturbed one.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 0) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls (caches, thread pools,
    lazy initialisation are paid by the warm-ups, not by the first timed call)."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return seconds


def best_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Fastest of :func:`time_calls`: for a machine's *capability* (its bandwidth, its matmul rate),
    interference only ever slows a call down, so the fastest call is the closest to the truth."""
    return min(time_calls(fn, repeats, warmup))


def p90(values: Sequence[float]) -> float:
    """Nearest-rank 90th percentile (the largest value for fewer than 10 samples)."""
    s = sorted(values)
    return s[min(len(s) - 1, int(0.9 * len(s)))]


def relative_range(values: Sequence[float]) -> float | None:
    """``(max - min) / median`` of repeats of one identical call: 0 on a quiet machine, large when
    something else took the cores meanwhile. ``None`` for fewer than two values."""
    if len(values) < 2:
        return None
    return (max(values) - min(values)) / statistics.median(values)


@dataclass(frozen=True)
class Summary:
    """Median, fastest and 90th-percentile value of some samples (same unit as the samples)."""

    median: float
    min: float
    p90: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Summary":
        if not values:
            raise ValueError("no samples to summarise")
        return cls(statistics.median(values), min(values), p90(values))

    def scaled(self, factor: float) -> "Summary":
        return Summary(self.median * factor, self.min * factor, self.p90 * factor)
