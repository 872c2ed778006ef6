"""Benchmarks: our kernel against dense attention on the CPU (cpu) and on a GPU (cuda), and whole
optimized models against their originals (cpu); timing holds the one timer and the kernel
benchmarks' problem (KernelCase), output the result rows, the table and the JSON writer.

The names below load their module on first use: `python -m tfsa_onnx.bench.cuda` runs on GPU
machines without click, onnx or onnxruntime, so nothing here imports them.
"""

from __future__ import annotations

_CPU = {
    "KernelResult",
    "ModelResult",
    "bench_kernel",
    "bench_model",
    "ort_fused_model",
    "plot_kernel_results",
}


def __getattr__(name: str):
    if name in _CPU:
        from tfsa_onnx.bench import cpu

        return getattr(cpu, name)
    raise AttributeError(f"module 'tfsa_onnx.bench' has no attribute {name!r}")
