"""bfloat16 for the tests: numpy has none, so tensors travel as their raw 16-bit patterns.

Both kernels round float32 to bfloat16 to nearest, ties to even (ONNX Runtime's BFloat16_t on
the CPU, __float2bfloat16_rn on CUDA); NaN stays NaN. These helpers do the same.
"""

from __future__ import annotations

import numpy as np


def to_bits(x: np.ndarray) -> np.ndarray:
    """float values as bfloat16 bit patterns (uint16), rounded to nearest even."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def from_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) as float32."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def rounded(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16, still as float32."""
    return from_bits(to_bits(x))
