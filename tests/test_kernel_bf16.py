"""compute_precision = bf16 on the CPU: the kernel against the reference's bf16 mode, and the
float32 fallback bit-equal to float32 mode."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from test_kernel import _random_case, random_qkv, run_op

from tfsa_onnx.reference import sparse_attention, to_bf16
from tfsa_onnx.runtime import cpu_computes_bf16

BF16 = cpu_computes_bf16()
needs_bf16 = pytest.mark.skipif(not BF16, reason="this CPU falls back to float32 (no AVX512_BF16)")


def _compare(y, q, k, v, mask, attrs):
    """The kernel's bf16 result against the reference's. The kernel rounds each probability
    against its running (tile) row max, the reference against the final one, so they agree to
    a bf16 rounding of P, not bitwise; the reference's float32 result must be clearly farther."""
    r16, _ = sparse_attention(q, k, v, mask, **attrs, compute_precision=1)
    r32, _ = sparse_attention(q, k, v, mask, **attrs)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(r16))
    finite = np.isfinite(r16)
    np.testing.assert_allclose(y[finite], r16[finite], atol=8e-3, rtol=2e-2)
    off_16, off_32 = np.abs(y - r16)[finite].mean(), np.abs(r16 - r32)[finite].mean()
    assert off_16 <= 0.5 * off_32 or off_32 < 1e-6, (off_16, off_32)


def test_to_bf16_rounds_to_nearest_even_and_keeps_nan():
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-9), np.inf, np.nan, 3.4e38], np.float32)
    expected = [1.0, 1.0, 1 + 2**-6, -1.0, np.inf, np.nan, np.inf]
    np.testing.assert_array_equal(to_bf16(x), np.array(expected, np.float32))


@needs_bf16
@pytest.mark.parametrize("seed", range(40))
def test_bf16_random_configurations_match_reference(seed):
    q, k, v, mask, attrs = _random_case(seed)
    y, density = run_op(q, k, v, mask, **attrs, compute_precision=1)
    _, density_ref = sparse_attention(q, k, v, mask, **attrs, compute_precision=1)
    np.testing.assert_allclose(density, density_ref, atol=1e-6)
    _compare(y, q, k, v, mask, attrs)


@needs_bf16
@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize(
    "shape", [(1, 4, 2, 300, 300, 64, 64), (2, 2, 1, 1, 70, 64, 64), (1, 1, 1, 130, 130, 33, 17)]
)
def test_bf16_dense_and_few_rows_match_reference(shape, causal):
    # one query row would take the few-rows path in float32 mode: bf16 takes the tiles
    q, k, v = random_qkv(np.random.default_rng(7), *shape)
    attrs = dict(is_causal=causal, min_seq_len=0, block_size=64)
    y, _ = run_op(q, k, v, **attrs, compute_precision=1)
    _compare(y, q, k, v, None, attrs)


@needs_bf16
def test_bf16_keeps_nan_to_the_rows_that_attend_it():
    q, k, v = random_qkv(np.random.default_rng(3), 1, 1, 1, 64, 64, 16, 16)
    v[0, 0, 40, 3] = np.nan  # the value of key 40: causal rows before it must stay finite
    attrs = dict(is_causal=1, min_seq_len=0, block_size=16)
    y, _ = run_op(q, k, v, **attrs, compute_precision=1)
    assert np.isfinite(y[0, 0, :40]).all() and np.isnan(y[0, 0, 40:, 3]).all()
    _compare(y, q, k, v, None, attrs)


@needs_bf16
def test_bf16_half_inputs():
    q, k, v = random_qkv(np.random.default_rng(5), 1, 2, 2, 100, 100, 64, 64, np.float16)
    attrs = dict(min_seq_len=0, threshold=0.7, global_tokens=0, local_window=0, block_size=32)
    y, _ = run_op(q, k, v, **attrs, compute_precision=1)
    _compare(y.astype(np.float32), q, k, v, None, attrs)


FALLBACK_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from test_kernel import _random_case, run_op
from tfsa_onnx.runtime import cpu_computes_bf16
assert not cpu_computes_bf16()
for seed in range(12):
    q, k, v, mask, attrs = _random_case(seed)
    a = run_op(q, k, v, mask, **attrs)
    b = run_op(q, k, v, mask, **attrs, compute_precision=1)
    for x, y in zip(a, b):
        assert np.array_equal(x.view(np.uint32), y.view(np.uint32)), seed
print("bit-equal")
"""


@pytest.mark.parametrize("isa", ["avx512-fp32", "generic"])
def test_fallback_is_bit_equal_to_float32_and_says_so_once(isa):
    env = dict(os.environ, TFSA_ISA=isa)
    tests = os.path.dirname(os.path.abspath(__file__))
    command = [sys.executable, "-c", FALLBACK_SCRIPT, tests]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "bit-equal" in out.stdout
    assert out.stderr.count("compute_precision=bf16 computes in float32") == 1, out.stderr


def test_compute_precision_out_of_range_is_an_error():
    q, k, v = random_qkv(np.random.default_rng(0), 1, 1, 1, 8, 8, 4, 4)
    with pytest.raises(Exception, match=r"compute_precision must be an integer in \[0, 1\]"):
        run_op(q, k, v, compute_precision=2)


@needs_bf16
def test_bf16_group_query_attention_prompt_matches_reference():
    from tfsa_onnx import DOMAIN
    from tfsa_onnx.opmodel import group_query_attention_model
    from tfsa_onnx.reference import group_query_attention
    from tfsa_onnx.runtime import make_session

    b, h, hkv, s, d = 1, 4, 2, 300, 64
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, s, h * d), dtype=np.float32)
    k, v = (rng.standard_normal((b, s, hkv * d), dtype=np.float32) for _ in range(2))
    lengths, total = np.full(b, s - 1, np.int32), np.array([s], np.int32)
    feeds = dict(query=q, key=k, value=v, seqlens_k=lengths, total_sequence_length=total)
    attrs = dict(num_heads=h, kv_num_heads=hkv, min_seq_len=0, threshold=0.8, compute_precision=1)
    model = group_query_attention_model(domain=DOMAIN, past=False, rotary=False, **attrs)
    y = make_session(model, 2).run(["output"], feeds)[0]
    r16 = group_query_attention(q, k, v, None, None, lengths, s, **attrs)[0]
    r32 = group_query_attention(q, k, v, None, None, lengths, s, **attrs | {"compute_precision": 0})[0]
    np.testing.assert_allclose(y, r16, atol=8e-3, rtol=2e-2)
    assert np.abs(y - r16).mean() <= 0.5 * np.abs(r16 - r32).mean()


@needs_bf16
def test_vdpbf16ps_kernels_alone_match_reference_too():
    # TFSA_ISA=avx512bf16 leaves out AMX: every row group takes the VDPBF16PS register tiles
    env = dict(os.environ, TFSA_ISA="avx512bf16")
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        __file__,
        "-k",
        "random or dense",
    ]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout
