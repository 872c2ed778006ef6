"""Kernel benchmark on an NVIDIA GPU: our CUDA SparseAttention against dense attention.

On the same random [B, H, S, D] inputs, timed with CUDA events on one stream after warm-up,
interleaved round by round, medians reported:
  ours         SparseAttention (global 0, local 0, threshold 1, the given max_density), through
               a single-node ONNX Runtime session on CUDAExecutionProvider when onnxruntime-gpu is
               installed, else through the CUDA library's C entry point (tfsa_onnx.cuda)
  selection    the same call with selection_only set: block choice plus zeroing the output
  ours_dense   our kernel in dense mode (max_density 1, threshold 1: every block)
  sdpa_flash   torch scaled_dot_product_attention, flash backend (memory-efficient for float32,
               which flash does not take)
  ort_mha      com.microsoft.MultiHeadAttention on CUDAExecutionProvider (onnxruntime-gpu only)
Speed-up = best dense / ours; dense_mode_ratio = best dense / ours_dense.

    tfsa-onnx bench kernel --provider cuda --heads 32 --head-dim 128 --seq-len 32768 --max-density 0.1
    python -m tfsa_onnx.bench.cuda ...   # the same without click (argparse)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from tfsa_onnx.bench.output import StreamTable, write_json
from tfsa_onnx.bench.timing import KernelCase, interleaved_medians, rate

DTYPES = ("float16", "bfloat16", "float32")
DENSE_BASELINES = ("sdpa_flash", "ort_mha")
COLUMNS = (
    "seq_len heads head_dim dtype density ours_ms selection_share sdpa_flash_ms ort_mha_ms "
    "speedup_vs_best_dense ours_dense_ms dense_mode_ratio dense_max_err ours_tflops best_dense_tflops"
)
PATH_ORT, PATH_DIRECT = "ort-cuda", "direct"


class CudaBenchError(Exception):
    """The benchmark cannot run here (no GPU, no CUDA library) or a call failed."""


@dataclass(kw_only=True)
class CudaKernelResult(KernelCase):
    dtype: str
    path: str
    density: float
    ours_ms: float
    selection_ms: float
    selection_share: float
    sdpa_flash_ms: float | None
    sdpa_backend: str
    ort_mha_ms: float | None
    best_dense: str | None
    speedup_vs_best_dense: float | None
    ours_dense_ms: float | None
    dense_mode_ratio: float | None  # the target: >= 0.6
    dense_max_err: float | None  # max |ours_dense - sdpa|: the two must compute the same thing
    ours_tflops: float | None  # on the blocks computed
    best_dense_tflops: float | None
    gpu: str
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- pure helpers


def choose_path(dtype: str, ort_has_cuda: bool) -> str:
    """ORT's CUDA provider when present; bfloat16 has no numpy type for io_binding, so direct."""
    return PATH_ORT if ort_has_cuda and dtype != "bfloat16" else PATH_DIRECT


def ratios(ms: Mapping[str, float | None]) -> dict[str, Any]:
    """Best dense baseline and the ratios read from the medians (ms); absent baselines are None."""
    dense = {name: ms[name] for name in DENSE_BASELINES if ms.get(name)}
    best = min(dense, key=dense.__getitem__) if dense else None
    ours_dense = ms.get("ours_dense")
    return {
        "best_dense": best,
        "speedup_vs_best_dense": dense[best] / ms["ours"] if best else None,
        "selection_share": ms["selection"] / ms["ours"],
        "dense_mode_ratio": dense[best] / ours_dense if best and ours_dense else None,
    }


# ---------------------------------------------------------------- GPU side


class EventTimer:
    """GPU time between two CUDA events on the current stream; read after sync()."""

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def time(self, run: Callable[[], object]) -> Callable[[], float]:
        start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        run()
        end.record()
        return lambda: start.elapsed_time(end)

    def sync(self) -> None:
        self.torch.cuda.synchronize()


@dataclass
class _Op:
    run: Callable[[], object]
    output: Callable[[], Any]  # the torch tensor the latest run() wrote
    density: Any = None
    keep: tuple = ()  # buffers and sessions the run needs alive


def require_gpu() -> None:
    """Raises CudaBenchError saying what is missing for --provider cuda."""
    try:
        import torch
    except ImportError:
        raise CudaBenchError("--provider cuda needs torch built with CUDA; torch is not installed") from None
    if not torch.cuda.is_available():
        raise CudaBenchError("--provider cuda needs an NVIDIA GPU: torch.cuda.is_available() is False")
    from tfsa_onnx import cuda

    try:
        cuda.library()
    except (FileNotFoundError, OSError) as e:
        raise CudaBenchError(f"--provider cuda needs the CUDA library: {e}") from None


def describe(dtype: str) -> str:
    """One line: the GPU, and which path runs our op (the answer differs between machines)."""
    import torch

    import tfsa_onnx

    ort_has_cuda = tfsa_onnx._onnxruntime_has_cuda()
    if choose_path(dtype, ort_has_cuda) == PATH_ORT:
        how = "a single-node ONNX Runtime session on CUDAExecutionProvider (io_binding)"
    elif ort_has_cuda:
        how = "the CUDA library's entry point (tfsa_onnx.cuda): ORT's io_binding takes no bfloat16"
    else:
        how = "the CUDA library's entry point (tfsa_onnx.cuda): onnxruntime has no CUDAExecutionProvider"
    return f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, {dtype}; ours via {how}"


def _direct_op(q, k, v, attributes: dict, selection_only: bool = False) -> _Op:
    """A prepared entry-point call: buffers allocated once, each run only enqueues the kernels."""
    from tfsa_onnx import cuda

    prepared = cuda.Prepared(q, k, v, selection_only=selection_only, **attributes)
    return _Op(prepared.run, lambda: prepared.output, prepared.density, keep=(prepared,))


def _ort_cuda_session(model, device, ours: bool, selection_only: bool = False):
    """A session on CUDAExecutionProvider that runs on torch's current stream, no CPU fallback."""
    import torch

    import tfsa_onnx
    from tfsa_onnx.runtime import make_session

    # One stream for torch and ORT, so the events bracket ORT's kernels (0 is refused: no default stream).
    options = {
        "device_id": str(device.index or 0),
        "user_compute_stream": str(torch.cuda.current_stream(device).cuda_stream),
    }
    return make_session(
        model,
        register=ours,
        library=tfsa_onnx.get_library_path("cuda") if ours else None,
        selection_only_run=selection_only,
        providers=[("CUDAExecutionProvider", options)],
        config={"session.disable_cpu_ep_fallback": "1"},  # every node on the GPU
    )


def _bind(binding, kind: str, name: str, tensor) -> None:
    import numpy as np
    import torch

    element = {torch.float16: np.float16, torch.float32: np.float32}[tensor.dtype]
    bind = binding.bind_input if kind == "input" else binding.bind_output
    bind(name, "cuda", tensor.device.index or 0, element, list(tensor.shape), tensor.data_ptr())


def _ort_op(q, k, v, attributes: dict, selection_only: bool = False) -> _Op:
    """Our op in a single-node ORT session, inputs and outputs bound to torch device tensors."""
    import torch
    from onnx import TensorProto

    from tfsa_onnx.opmodel import sparse_attention_model

    elem = {torch.float16: TensorProto.FLOAT16, torch.float32: TensorProto.FLOAT}[q.dtype]
    session = _ort_cuda_session(
        sparse_attention_model(dtype=elem, **attributes), q.device, True, selection_only
    )
    output = torch.empty((*q.shape[:3], v.shape[3]), dtype=q.dtype, device=q.device)
    density = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    binding = session.io_binding()
    for name, tensor in (("query", q), ("key", k), ("value", v)):
        _bind(binding, "input", name, tensor)
    _bind(binding, "output", "Y", output)
    _bind(binding, "output", "density", density)
    run = lambda: session.run_with_iobinding(binding)  # noqa: E731
    return _Op(run, lambda: output, density, keep=(session, binding, q, k, v))


def _ort_mha_op(q, k, v, causal: bool) -> _Op:
    """com.microsoft.MultiHeadAttention on [B, S, H*D] copies of the inputs; output back as [B, H, S, D]."""
    import torch
    from onnx import TensorProto

    from tfsa_onnx.opmodel import mha_model

    b, h, s, d = q.shape
    model = mha_model(h, causal)
    elem = {torch.float16: TensorProto.FLOAT16, torch.float32: TensorProto.FLOAT}[q.dtype]
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = elem
    session = _ort_cuda_session(model, q.device, ours=False)
    packed = [t.transpose(1, 2).reshape(b, s, h * d).contiguous() for t in (q, k, v)]
    output = torch.empty_like(packed[0])
    binding = session.io_binding()
    for name, tensor in zip("qkv", packed, strict=True):
        _bind(binding, "input", name, tensor)
    _bind(binding, "output", "y", output)
    unpacked = output.view(b, s, h, d).transpose(1, 2)
    run = lambda: session.run_with_iobinding(binding)  # noqa: E731
    return _Op(run, lambda: unpacked, keep=(session, binding, *packed))


def _sdpa_op(q, k, v, causal: bool) -> tuple[_Op, str]:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    backend = SDPBackend.EFFICIENT_ATTENTION if q.dtype == torch.float32 else SDPBackend.FLASH_ATTENTION
    result: list = [None]

    def run() -> None:
        with sdpa_kernel(backend):
            result[0] = scaled_dot_product_attention(q, k, v, is_causal=causal)

    run()  # fails here, not inside the timed rounds, when the backend refuses the inputs
    return _Op(run, lambda: result[0]), backend.name.lower()


def _inputs(batch: int, heads: int, seq_len: int, head_dim: int, dtype: str):
    import torch

    generator = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, heads, seq_len, head_dim)
    return [
        torch.randn(shape, generator=generator, device="cuda", dtype=getattr(torch, dtype)) for _ in range(3)
    ]


def _ours_ops(path: str, q, k, v, attributes: dict, dense_mode: bool) -> dict[str, _Op]:
    make = _ort_op if path == PATH_ORT else _direct_op
    ops = {"ours": make(q, k, v, attributes), "selection": make(q, k, v, attributes, selection_only=True)}
    if dense_mode and attributes["max_density"] < 1:
        ops["ours_dense"] = make(q, k, v, {**attributes, "max_density": 1.0})
    return ops


def _dense_ops(q, k, v, causal: bool, ort_has_cuda: bool, notes: list[str]) -> tuple[dict[str, _Op], str]:
    """The dense baselines that run here; why one does not goes to notes."""
    import torch

    ops: dict[str, _Op] = {}
    backend = "-"
    try:
        ops["sdpa_flash"], backend = _sdpa_op(q, k, v, causal)
    except RuntimeError as e:
        notes.append(f"sdpa: {_first_line(e)}")
    if not ort_has_cuda:
        notes.append("ort_mha: onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu not installed)")
    elif q.dtype == torch.bfloat16:
        notes.append("ort_mha: skipped for bfloat16 (no numpy type for io_binding)")
    else:
        try:
            ops["ort_mha"] = _ort_mha_op(q, k, v, causal)
        except Exception as e:  # noqa: BLE001 - a missing baseline must not stop the benchmark
            notes.append(f"ort_mha: {_first_line(e)}")
    return ops, backend


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _max_err(a, b) -> float:
    return float((a.float() - b.float()).abs().max().item())


@dataclass
class _Measured:
    ms: dict[str, float | None]
    density: float
    dense_max_err: float | None
    sdpa_backend: str
    notes: list[str]


def _measure(path: str, case: KernelCase, dtype: str, options: dict) -> _Measured:
    import torch

    import tfsa_onnx

    attributes = case.attributes()
    notes: list[str] = []
    with torch.cuda.stream(torch.cuda.Stream()):  # a real stream: ORT refuses the default one
        q, k, v = _inputs(*case.shape, dtype)
        ours = _ours_ops(path, q, k, v, attributes, options["dense_mode"])
        dense, backend = _dense_ops(q, k, v, case.causal, tfsa_onnx._onnxruntime_has_cuda(), notes)
        runs = {name: op.run for name, op in {**ours, **dense}.items()}
        ms: dict[str, float | None] = dict(
            interleaved_medians(runs, EventTimer(), options["warmup"], options["repeat"])
        )
        density = float(ours["ours"].density.mean().item())
        if case.max_density >= 1:  # ours already is the dense mode
            ours["ours_dense"], ms["ours_dense"] = ours["ours"], ms["ours"]
        error = None
        if "ours_dense" in ours and "sdpa_flash" in dense:
            error = _max_err(ours["ours_dense"].output(), dense["sdpa_flash"].output())
    return _Measured(ms, density, error, backend, notes)


def bench_kernel_cuda(
    case: KernelCase, *, dtype: str = "float16", warmup: int = 3, repeat: int = 10, dense_mode: bool = True
) -> CudaKernelResult:
    """Time ours / selection / ours in dense mode / the dense baselines on one case (module doc)."""
    import torch

    import tfsa_onnx

    if dtype not in DTYPES:
        raise CudaBenchError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = choose_path(dtype, tfsa_onnx._onnxruntime_has_cuda())
    m = _measure(path, case, dtype, dict(dense_mode=dense_mode, warmup=warmup, repeat=repeat))
    derived = ratios(m.ms)
    flops = case.flops()
    best = derived.pop("best_dense")
    return CudaKernelResult(
        **asdict(case),
        dtype=dtype,
        path=path,
        density=m.density,
        ours_ms=m.ms["ours"],
        selection_ms=m.ms["selection"],
        sdpa_flash_ms=m.ms.get("sdpa_flash"),
        sdpa_backend=m.sdpa_backend,
        ort_mha_ms=m.ms.get("ort_mha"),
        best_dense=best,
        ours_dense_ms=m.ms.get("ours_dense"),
        dense_max_err=m.dense_max_err,
        ours_tflops=rate(flops * m.density, m.ms["ours"], 1e12),
        best_dense_tflops=rate(flops, m.ms[best], 1e12) if best else None,
        gpu=torch.cuda.get_device_name(),
        notes=m.notes,
        **derived,
    )


def run_bench(
    seq_lens: list[int], echo: Callable[[str], None], json_path: str | None = None, **options: Any
) -> list[str]:
    """The command's body (click and argparse front ends): a table row per length; returns failures.
    options: KernelCase's fields (heads, ...) and bench_kernel_cuda's (dtype, ...).

    A length that fails (out of memory, a kernel error) is reported and the next one still runs,
    so one run on a borrowed GPU machine gives every figure it can.
    """
    import torch

    require_gpu()
    echo(describe(options.get("dtype", "float16")))
    table = StreamTable(COLUMNS, echo)
    rows, failures = [], []
    options = dict(options)
    for case in KernelCase.each(seq_lens, options):
        try:
            rows.append(bench_kernel_cuda(case, **options).as_dict())
        except (RuntimeError, CudaBenchError) as e:  # torch's OutOfMemoryError is a RuntimeError
            failures.append(f"seq_len {case.seq_len}: {_first_line(e)}")
            echo(f"seq_len {case.seq_len} failed: {_first_line(e)}")
        else:
            table.row(rows[-1])
        torch.cuda.empty_cache()  # here, once the except block has let go of a failed row's tensors
    for note in dict.fromkeys(n for r in rows for n in r["notes"]):
        echo(f"note: {note}")
    write_json(json_path, rows, echo)
    return failures


# ---------------------------------------------------------------- python -m tfsa_onnx.bench.cuda


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tfsa_onnx.bench.cuda", description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=_int_list, default=[8192], help="sequence length(s), comma-separated")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-density", type=float, default=0.125)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dtype", choices=DTYPES, default="float16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10, help="timed rounds (median reported)")
    p.add_argument("--no-dense-mode", action="store_true", help="skip our kernel in dense mode")
    p.add_argument("--json", dest="json_path", help="write every figure as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    if not 0 < args["max_density"] <= 1:
        print("Error: --max-density must be in (0, 1]", file=sys.stderr)
        return 2
    from tfsa_onnx.files import OutputError

    args["dense_mode"] = not args.pop("no_dense_mode")
    try:
        failures = run_bench(args.pop("seq_len"), print, **args)
    except (CudaBenchError, OutputError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    for failure in failures:
        print(f"Error: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
