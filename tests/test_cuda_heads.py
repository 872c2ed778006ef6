"""Per-head budgets (head_thresholds) and streaming heads in the CUDA kernels, through their C
entry point: the CPU emulation everywhere, the GPU where there is one (tests/test_cuda.py's
backends), against the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from test_cuda import _check, _inputs, backend  # noqa: F401  (the backend fixture)

from tfsa_onnx import cuda
from tfsa_onnx.reference import HEAD_THRESHOLDS_MAX, SparseAttentionAttributes, select_blocks

# b, hq, hkv, sq, sk, d, dv, dtype, attributes: every estimate, GQA, causal, ragged lengths
HEAD_CASES = [
    (1, 4, 2, 100, 130, 16, 16, "float32", dict(block_size=16, global_tokens=8, local_window=16)),
    (
        1,
        3,
        1,
        90,
        90,
        64,
        64,
        "float16",
        dict(block_size=16, is_causal=1, global_tokens=0, local_window=16, estimate=1),
    ),
    (2, 2, 2, 77, 77, 32, 32, "float32", dict(block_size=20, global_tokens=4, local_window=8, estimate=2)),
    (
        1,
        4,
        4,
        64,
        64,
        32,
        32,
        "float32",
        dict(block_size=8, max_density=0.5, is_causal=1, global_tokens=0, local_window=8),
    ),
]
THRESHOLDS = {1: (0.0,), 2: (0.7, 0.0), 3: (0.0, 0.8, 1.0), 4: (0.9, 0.0, 0.5, 1.0)}


@pytest.mark.parametrize("case", HEAD_CASES, ids=lambda c: f"{c[1]}x{c[2]}-{c[3]}x{c[4]}-{c[7]}")
def test_head_thresholds_match_the_reference(backend, case):  # noqa: F811  (the fixture)
    b, hq, hkv, sq, sk, d, dv, dtype, attrs = case
    q, k, v = _inputs(np.random.default_rng(sq + hq), b, hq, hkv, sq, sk, d, dv, dtype)
    attrs = dict(attrs, min_seq_len=0, head_thresholds=THRESHOLDS[hq])
    _, density, selected = _check(backend, q, k, v, None, dtype, **attrs)
    streaming = [h for h, t in enumerate(THRESHOLDS[hq]) if t == 0.0]
    others = [h for h in range(hq) if h not in streaming]
    assert density[:, streaming].max() < density[:, others].min()


def test_a_streaming_head_selects_exactly_its_forced_blocks(backend):  # noqa: F811
    q, k, v = _inputs(np.random.default_rng(3), 1, 2, 1, 128, 128, 32, 32, "float32")
    attrs = dict(block_size=16, global_tokens=16, local_window=16, min_seq_len=0, is_causal=1)
    _, _, selected = backend.run(q, k, v, None, "float32", head_thresholds=(0.0, 0.6), **attrs)
    allowed = np.tril(np.ones((8, 8), bool))[None, None].repeat(2, axis=1)
    expected = select_blocks(q, k, allowed, SparseAttentionAttributes(**attrs, head_thresholds=(0.0, 0.6)))
    assert np.array_equal(selected[0, 0], expected[0, 0])  # global + local only, no estimate's pick
    assert selected[0, 1].sum() > selected[0, 0].sum()


def test_bad_head_thresholds_are_errors(emulated_library):
    lib = cuda.load(str(emulated_library))
    shapes = ((1, 2, 8, 16), (1, 1, 8, 16), (1, 1, 8, 16))
    with pytest.raises(RuntimeError, match="head_thresholds gives 3 thresholds for 2 query heads"):
        cuda.run(cuda.make_args(shapes, head_thresholds=(0.5, 0.5, 0.5)), 0, lib)
    with pytest.raises(RuntimeError, match=r"head_thresholds values must be floats in \[0, 1\]"):
        cuda.run(cuda.make_args(shapes, head_thresholds=(0.5, 2.0)), 0, lib)
    assert cuda.workspace_bytes(cuda.make_args(shapes, head_thresholds=(0.5,)), lib) == 0
    with pytest.raises(ValueError, match=f"at most {HEAD_THRESHOLDS_MAX} values"):
        cuda.make_args(shapes, head_thresholds=(0.5,) * (HEAD_THRESHOLDS_MAX + 1))
