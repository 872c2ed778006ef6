"""The benchmarks' timer: runs interleaved round by round, medians reported; the work they time.

Interleaving makes a noisy machine slow every run alike, so the ratios hold even when the
absolute times do not. Standard library only.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Protocol


class Timer(Protocol):
    """time(run) runs it and returns a reader of its ms (read after sync())."""

    def time(self, run: Callable[[], object]) -> Callable[[], float]: ...

    def sync(self) -> None: ...


class WallTimer:
    """Wall-clock time of each run (CPU work: the run is done when it returns)."""

    def time(self, run: Callable[[], object]) -> Callable[[], float]:
        start = time.perf_counter()
        run()
        elapsed = (time.perf_counter() - start) * 1e3
        return lambda: elapsed

    def sync(self) -> None:
        pass


def interleaved_medians(
    runs: Mapping[str, Callable[[], object]], timer: Timer, warmup: int, repeat: int
) -> dict[str, float]:
    """Median ms of each run over `repeat` rounds, each round running every one once in turn."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    timer.sync()
    pending: dict[str, list[Callable[[], float]]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            pending[name].append(timer.time(run))
    timer.sync()
    return {name: statistics.median(read() for read in reads) for name, reads in pending.items()}


def dense_flops(batch: int, heads: int, seq_len: int, head_dim: int, causal: bool) -> float:
    """Dense attention work: QK^T and PV at 2 flops per multiply-add; causal attention does half."""
    return 4.0 * batch * heads * seq_len * seq_len * head_dim * (0.5 if causal else 1.0)


def rate(flops: float, ms: float | None, unit: float) -> float | None:
    """flops per second in `unit` (1e9: GFLOP/s, 1e12: TFLOP/s); None without a time."""
    return flops / (ms * 1e-3) / unit if ms else None
