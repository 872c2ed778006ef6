"""Attention matchers (one module per family) and the pass that replaces them."""

from tfsa_onnx.rewrite.common import GiveUp, Site
from tfsa_onnx.rewrite.passes import (
    OptimizeError,
    Report,
    find_sites,
    load_ir,
    optimize,
    optimize_ir,
    save_ir,
)

__all__ = [
    "GiveUp",
    "OptimizeError",
    "Report",
    "Site",
    "find_sites",
    "load_ir",
    "optimize",
    "optimize_ir",
    "save_ir",
]
