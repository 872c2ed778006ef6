"""Property tests: the CPU kernel and the CUDA kernels (emulated) against the numpy reference
on configurations drawn widely by hypothesis.

Shapes: Sq <= block_size with per-row masks, Sq != Sk both ways, causal with Sq < Sk, GQA,
head dims 8..256, block sizes that are not powers of two (and past the sequence). Masks: none,
bool or additive, in every broadcast shape of [B, Hq, Sq, Sk] (rank 2 to 4), with fully masked
rows. Attributes across their range (per-head thresholds too). Some cases hold one NaN or
infinity in the query, key, value or mask (the reference's NaN rule). Tolerance 1e-4 in float32.

The default run draws a fixed set (derandomized); `pytest -m slow tests/test_fuzz.py` draws
1,000 fresh cases per kernel.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cuda import Emulated
from test_kernel import run_op

from tfsa_onnx.reference import sparse_attention

TOLERANCE = 1e-4
EMULATED_LEN = 72  # the emulation runs every CUDA thread as a fiber: slow, so shorter sequences
HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]


@st.composite
def cases(draw, max_len: int = 300, max_heads: int = 3):
    """(q, k, v, mask, attrs) of one drawn configuration."""
    hkv = draw(st.integers(1, max_heads))
    hq = hkv * draw(st.integers(1, max_heads))
    b = draw(st.integers(1, 2))
    block = draw(st.one_of(st.sampled_from([1, 3, 16, 50, 64, 100, 128, 4096]), st.integers(1, 160)))
    sk = draw(st.integers(1, max_len))
    sq = draw(
        st.one_of(
            st.just(sk),  # self-attention
            st.integers(1, max(1, min(block, max_len))),  # the queries fit in one block
            st.integers(1, max_len),  # shorter or longer than the keys
        )
    )
    d = draw(st.one_of(st.sampled_from([8, 16, 32, 64, 80, 96, 128, 256]), st.integers(8, 256)))
    dv = draw(st.one_of(st.just(d), st.integers(8, 256)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, hq, sq, d)).astype(np.float32)
    k = rng.standard_normal((b, hkv, sk, d)).astype(np.float32)
    v = rng.standard_normal((b, hkv, sk, dv)).astype(np.float32)

    mask = None
    kind = draw(st.sampled_from(["none", "bool", "float"]))
    if kind != "none":
        full = (b, hq, sq, sk)
        rank = draw(st.integers(2, 4))
        keep = draw(st.lists(st.booleans(), min_size=4, max_size=4))  # which axes the mask holds
        shape = tuple(n if keep[axis] else 1 for axis, n in enumerate(full))[4 - rank :]
        open_share = draw(st.sampled_from([0.3, 0.8, 1.0]))
        allowed = rng.random(shape) < open_share
        if draw(st.booleans()) and shape[-2] > 1:  # a row that may attend to nothing
            allowed[..., int(rng.integers(shape[-2])), :] = False
        if kind == "bool":
            mask = allowed
        else:
            scale = draw(st.sampled_from([0.0, 1.0, 4.0]))
            mask = np.where(allowed, scale * rng.standard_normal(shape), -np.inf).astype(np.float32)

    poison = draw(st.sampled_from([None] * 6 + ["query", "key", "value", "mask"]))
    if poison is not None:
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        target = {"query": q, "key": k, "value": v, "mask": mask}[poison]
        if target is not None and target.dtype != np.bool_:
            target[tuple(int(rng.integers(n)) for n in target.shape)] = value

    attrs = dict(
        block_size=block,
        is_causal=draw(st.integers(0, 1)),
        global_tokens=draw(st.sampled_from([0, 0, 1, 5, 64, 2**31 - 1])),
        local_window=draw(st.sampled_from([0, 0, 1, 10, 100, 2**31 - 1])),
        threshold=draw(st.sampled_from([0.0, 0.25, 0.5, 0.875, 1.0])),
        max_density=draw(st.sampled_from([0.125, 0.5, 0.75, 1.0])),
        min_seq_len=draw(st.sampled_from([0, 0, 0, 150, 2**31 - 1])),
        scale=draw(st.sampled_from([0.0, 0.0, 0.3])),
        estimate=draw(st.integers(0, 2)),
        estimate_stride=draw(st.sampled_from([1, 2, 8, 16, 1000])),
        query_positions=draw(st.integers(0, 1)),
        softcap=draw(st.sampled_from([0.0, 0.0, 0.0, 0.5, 30.0])),
    )
    if draw(st.booleans()):  # per-head budgets, streaming (0) and dense (1) heads among them
        heads = st.lists(st.sampled_from([0.0, 0.0, 0.25, 0.5, 0.875, 1.0]), min_size=hq, max_size=hq)
        attrs["head_thresholds"] = tuple(draw(heads))
    return q, k, v, mask, attrs


def _compare(y, density, q, k, v, mask, attrs):
    y_ref, density_ref = sparse_attention(q, k, v, mask, **attrs)
    np.testing.assert_allclose(density, density_ref, atol=1e-6, err_msg=f"density, {attrs}")
    # NaN where the reference has NaN (equal_nan), and nowhere else
    np.testing.assert_allclose(y, y_ref, atol=TOLERANCE, rtol=TOLERANCE, err_msg=f"output, {attrs}")


def _check_cpu(case):
    q, k, v, mask, attrs = case
    y, density = run_op(q, k, v, mask, **attrs)
    _compare(y, density, q, k, v, mask, attrs)


def _check_emulated(library, case, copies):
    q, k, v, mask, attrs = case
    previous = os.environ.get("TFSA_EMULATION_COPIES")
    os.environ["TFSA_EMULATION_COPIES"] = copies
    try:
        y, density, _ = Emulated(library).run(q, k, v, mask, "float32", **attrs)
    finally:
        if previous is None:
            del os.environ["TFSA_EMULATION_COPIES"]
        else:
            os.environ["TFSA_EMULATION_COPIES"] = previous
    _compare(y, density, q, k, v, mask, attrs)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=HEALTH)
@given(case=cases())
def test_cpu_kernel_matches_reference(case):
    _check_cpu(case)


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, suppress_health_check=HEALTH)
@given(case=cases())
def test_cpu_kernel_matches_reference_1000(case):
    _check_cpu(case)


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=HEALTH)
@given(case=cases(max_len=EMULATED_LEN, max_heads=2), copies=st.sampled_from(["late", "early"]))
def test_cuda_emulation_matches_reference(emulated_library, case, copies):
    _check_emulated(emulated_library, case, copies)


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, suppress_health_check=HEALTH)
@given(case=cases(max_len=EMULATED_LEN, max_heads=2), copies=st.sampled_from(["late", "early"]))
def test_cuda_emulation_matches_reference_1000(emulated_library, case, copies):
    _check_emulated(emulated_library, case, copies)
