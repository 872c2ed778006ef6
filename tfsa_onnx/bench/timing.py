"""The benchmarks' timer: runs interleaved round by round, medians reported; the work they time
(the kernel benchmarks' problem, KernelCase, and its dense FLOP count).

Interleaving makes a noisy machine slow every run alike, so the ratios hold even when the
absolute times do not. Standard library only (KernelCase.attributes loads the reference).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol, TypeVar

from tfsa_onnx.bench.output import Row

R = TypeVar("R")


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


def rounds(runs: Mapping[str, Callable[[], R]], repeat: int) -> dict[str, list[R]]:
    """What each run returns over `repeat` rounds, each round running every one once in turn."""
    results: dict[str, list[R]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            results[name].append(run())
    return results


def interleaved_medians(
    runs: Mapping[str, Callable[[], object]], timer: Timer, warmup: int, repeat: int
) -> dict[str, float]:
    """Median ms of each run over `repeat` rounds (after `warmup` untimed ones)."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    timer.sync()
    pending = rounds({name: (lambda run=run: timer.time(run)) for name, run in runs.items()}, repeat)
    timer.sync()
    return {name: statistics.median(read() for read in reads) for name, reads in pending.items()}


def dense_flops(batch: int, heads: int, seq_len: int, head_dim: int, causal: bool) -> float:
    """Dense attention work: QK^T and PV at 2 flops per multiply-add; causal attention does half."""
    return 4.0 * batch * heads * seq_len * seq_len * head_dim * (0.5 if causal else 1.0)


def rate(flops: float, ms: float | None, unit: float) -> float | None:
    """flops per second in `unit` (1e9: GFLOP/s, 1e12: TFLOP/s); None without a time."""
    return flops / (ms * 1e-3) / unit if ms else None


@dataclass
class KernelCase(Row):
    """One kernel benchmark's problem, on the CPU or a GPU: random [batch, heads, seq_len,
    head_dim] query, key and value, and blocks chosen under the max_density cap alone."""

    seq_len: int
    heads: int = 12
    head_dim: int = 64
    batch: int = 1
    max_density: float = 0.125
    causal: bool = False
    block_size: int = 64
    kv_heads: int = 0  # key/value heads (grouped-query attention); 0: as many as query heads

    @classmethod
    def each(cls, seq_lens: Iterable[int], options: dict[str, Any]) -> list[KernelCase]:
        """A case per length from the case's fields in options, taken out of it (what is left
        are the benchmark's own options: threads, repeat, ...)."""
        names = [f.name for f in fields(cls) if f.name != "seq_len"]
        shape = {name: options.pop(name) for name in names if name in options}
        return [cls(seq_len, **shape) for seq_len in seq_lens]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.heads, self.seq_len, self.head_dim)

    @property
    def kv_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.kv_heads or self.heads, self.seq_len, self.head_dim)

    def attributes(self, **estimate: int) -> dict[str, Any]:
        """The op's attributes (SparseAttentionAttributes.capped), with the estimate's settings."""
        from tfsa_onnx.reference import SparseAttentionAttributes

        causal = int(self.causal)
        return SparseAttentionAttributes.capped(
            self.max_density, is_causal=causal, block_size=self.block_size, **estimate
        ).as_dict()

    def flops(self) -> float:
        return dense_flops(self.batch, self.heads, self.seq_len, self.head_dim, self.causal)
