"""The one place that makes an ONNX Runtime session for the package's own runs (validate,
calibrate, the benchmarks, the mask probe, export's check, genai folders' decoders), and the
kernel's selection-only switch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

SELECTION_ONLY_ENV = "TFSA_SELECTION_ONLY"


@contextlib.contextmanager
def selection_only(on: bool) -> Iterator[None]:
    """The kernel reads TFSA_SELECTION_ONLY when its session is created: block selection (and key
    packing) alone, no attention computed, to time the selection's share. Off restores what was set."""
    previous = os.environ.pop(SELECTION_ONLY_ENV, None)
    if on:
        os.environ[SELECTION_ONLY_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(SELECTION_ONLY_ENV, None)
        if previous is not None:
            os.environ[SELECTION_ONLY_ENV] = previous


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc keeps it otherwise), so that a
    model's weights or a released session's arena do not count toward the next phase's peak."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)


def run_shrinking(session: Any, names: list[str] | None, feed: dict[str, Any]) -> list[Any]:
    """session.run, after which the CPU arena hands back what the run grew it by: validate and
    calibrate run big models several times, and a kept arena grows from run to run (SmolLM2 at
    4,096 tokens, 3 runs: 4.21 GB peak kept, 3.77 GB shrunk, the same run times)."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return session.run(names, feed, options)


def uses_our_domain(model: Any) -> bool:
    from tfsa_onnx import DOMAIN

    return any(n.domain == DOMAIN for n in model.graph.node)


def make_session(
    model: Any,
    threads: int | None = None,
    *,
    inter_threads: int | None = None,
    register: bool | None = None,
    library: str | os.PathLike | None = None,
    log_level: int = 3,
    selection_only_run: bool | None = None,
    mem_pattern: bool = True,
    providers: list | None = None,
    config: dict[str, str] | None = None,
):
    """An ORT session for a ModelProto or a path, on CPUExecutionProvider unless `providers`
    (ORT's argument) says otherwise.

    register: a custom-op library is registered when True: `library`, by default ours
    (tfsa_onnx.get_library_path()); None (the default) registers it for a model that uses our
    domain, and always for a path (registering costs nothing and keeps our nodes loadable).
    threads/inter_threads: intra-/inter-op thread counts (None: ORT's default). log_level 3
    hides the shape-merge warnings about custom-op outputs. selection_only_run: True/False
    set/clear the kernel's selection-only switch while the session is made (None: the
    environment as it is). mem_pattern=False: runs after the first reuse the arena the first
    one grew instead of allocating the planned block beside it (validate and calibrate: SmolLM2 at
    8,192 tokens takes 13.4 GB for one run, 22.5 GB from the second run on with the pattern).
    config: session config entries (add_session_config_entry).
    """
    import onnxruntime as ort

    from tfsa_onnx import get_library_path

    so = ort.SessionOptions()
    so.log_severity_level = log_level
    so.enable_mem_pattern = mem_pattern
    if threads:
        so.intra_op_num_threads = threads
    if inter_threads:
        so.inter_op_num_threads = inter_threads
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    is_path = isinstance(model, str | os.PathLike)
    if register if register is not None else (is_path or uses_our_domain(model)):
        so.register_custom_ops_library(os.fspath(library) if library else get_library_path())
    source = os.fspath(model) if is_path else model.SerializeToString()
    switch = contextlib.nullcontext() if selection_only_run is None else selection_only(selection_only_run)
    with switch:
        return ort.InferenceSession(source, so, providers=providers or ["CPUExecutionProvider"])


def cpu_bf16_kernels() -> str | None:
    """What compute_precision=bf16 runs on this CPU: "AMX" (tiles, head dims that are multiples
    of 32; AVX512_BF16 for the rest), "AVX512_BF16", or None where it falls back to float32 (no
    AVX512_BF16, or TFSA_ISA forcing other kernels)."""
    import ctypes

    from tfsa_onnx import get_library_path

    library = ctypes.CDLL(get_library_path())
    library.tfsa_cpu_bf16.restype = ctypes.c_int32
    return {0: None, 1: "AVX512_BF16", 2: "AMX"}[library.tfsa_cpu_bf16()]


def cpu_computes_bf16() -> bool:
    """Whether compute_precision=bf16 runs bf16 kernels on this CPU rather than float32."""
    return cpu_bf16_kernels() is not None
