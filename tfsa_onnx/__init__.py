"""tfsa-onnx: training-free sparse attention for ONNX models.

import onnxruntime as ort, tfsa_onnx
session = ort.InferenceSession("model.tfsa.onnx", tfsa_onnx.session_options())
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"
DOMAIN = "ai.tfsa"
OP_TYPE = "SparseAttention"
OP_VERSION = 1

_LIBRARY_NAMES = ("libtfsa_ops.so", "libtfsa_ops.dylib", "tfsa_ops.dll")


def get_library_path() -> str:
    """Path of the custom-op library to pass to SessionOptions.register_custom_ops_library."""
    here = Path(__file__).resolve().parent
    for name in _LIBRARY_NAMES:
        if (here / name).is_file():
            return str(here / name)
    raise FileNotFoundError(
        f"the tfsa-onnx operator library is not in {here}; install the package with "
        "'pip install .' (or run 'make build' in a source checkout) to build it"
    )


def session_options(so=None):
    """Return onnxruntime.SessionOptions (the given one, or a new one) with our ops registered."""
    import onnxruntime as ort

    so = so if so is not None else ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    return so


def __getattr__(name: str):
    # optimize/validate pull in onnx, onnxscript and more: import them on first use.
    if name == "optimize":
        from tfsa_onnx.rewrite import optimize

        return optimize
    if name == "validate":
        from tfsa_onnx.validate import validate

        return validate
    raise AttributeError(f"module 'tfsa_onnx' has no attribute {name!r}")
