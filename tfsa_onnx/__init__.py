"""tfsa-onnx: training-free sparse attention for ONNX models.

import onnxruntime as ort, tfsa_onnx
session = ort.InferenceSession("model.tfsa.onnx", tfsa_onnx.session_options())
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"
DOMAIN = "ai.tfsa"
OP_TYPE = "SparseAttention"
GQA_OP_TYPE = "SparseGroupQueryAttention"  # the drop-in for com.microsoft.GroupQueryAttention
OP_VERSION = 1

_CPU_LIBRARIES = ("libtfsa_ops.so", "libtfsa_ops.dylib", "tfsa_ops.dll")
_CUDA_LIBRARIES = ("libtfsa_ops_cuda.so", "tfsa_ops_cuda.dll")


def _find(names: tuple[str, ...]) -> Path | None:
    here = Path(__file__).resolve().parent
    return next((here / name for name in names if (here / name).is_file()), None)


def _onnxruntime_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def get_library_path(provider: str | None = None) -> str:
    """Path of the custom-op library to pass to SessionOptions.register_custom_ops_library.

    provider: "cpu" (the CPU library), "cuda" (the library that also registers the op for
    CUDAExecutionProvider), or None: $TFSA_ONNX_LIBRARY if set, else "cuda" when that library
    was built and the installed onnxruntime has the CUDA provider (onnxruntime-gpu), else "cpu".
    """
    import os

    provider = provider or os.environ.get("TFSA_ONNX_LIBRARY") or None
    if provider not in (None, "cpu", "cuda"):
        raise ValueError(f"provider must be 'cpu' or 'cuda', got {provider!r}")
    cuda = _find(_CUDA_LIBRARIES)
    if provider == "cuda" or (provider is None and cuda is not None and _onnxruntime_has_cuda()):
        if cuda is None:
            raise FileNotFoundError(
                "the tfsa-onnx CUDA library was not built: install the package on a machine with the "
                "CUDA toolkit (nvcc on PATH), or build with -DTFSA_CUDA=ON"
            )
        return str(cuda)
    cpu = _find(_CPU_LIBRARIES)
    if cpu is None:
        raise FileNotFoundError(
            f"the tfsa-onnx operator library is not in {Path(__file__).resolve().parent}; install the "
            "package with 'pip install .' (or run 'make build' in a source checkout) to build it"
        )
    return str(cpu)


def session_options(so=None):
    """Return onnxruntime.SessionOptions (the given one, or a new one) with our ops registered."""
    import onnxruntime as ort

    so = so if so is not None else ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    return so


def __getattr__(name: str):
    # The Python entry points load on first use: optimize/validate import onnx, onnx_ir and
    # onnxruntime; export imports torch and transformers (its module, tfsa_onnx.exporter, and
    # tfsa_onnx.validation are named apart from these functions so that importing them never
    # replaces the function with the module).
    if name == "export":
        from tfsa_onnx.exporter import export

        return export
    if name == "optimize":
        from tfsa_onnx.rewrite import optimize

        return optimize
    if name == "validate":
        from tfsa_onnx.validation import validate

        return validate
    raise AttributeError(f"module 'tfsa_onnx' has no attribute {name!r}")
