"""The softcap attribute (Gemma 2's logit softcapping) on the CPU kernel against the reference."""

from __future__ import annotations

import numpy as np
import pytest
from test_kernel import SPARSE_OFF, random_qkv, run_op
from test_kernel_bias import run_op as run_op_with_bias

from tfsa_onnx.reference import sparse_attention


def capped_attention(q, k, v, softcap, mask=None, causal=False):
    """softmax(softcap * tanh(QK^T / sqrt(D) / softcap) + mask) V in float64, written out
    apart from the reference: Gemma 2's eager attention."""
    group = q.shape[1] // k.shape[1]
    k, v = (np.repeat(t.astype(np.float64), group, axis=1) for t in (k, v))
    s = q.astype(np.float64) @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    s = softcap * np.tanh(s / softcap)
    if mask is not None:
        s = s + np.where(mask, 0.0, -np.inf)
    if causal:
        sq, sk = s.shape[-2:]
        s = np.where(np.arange(sk)[None] <= np.arange(sq)[:, None] + sk - sq, s, -np.inf)
    w = np.exp(s - s.max(axis=-1, keepdims=True))
    return (w / w.sum(axis=-1, keepdims=True)) @ v


# (b, hq, hkv, sq, sk, d, block, causal): the tile walk at awkward lengths, and few rows
# (the exact-rows path: up to 4 query rows without mask or estimate)
DENSE_SHAPES = [
    (1, 2, 1, 100, 100, 40, 16, 1),
    (2, 4, 2, 33, 95, 24, 8, 0),
    (1, 2, 2, 3, 70, 16, 64, 1),
    (1, 3, 1, 1, 9, 8, 64, 0),
    (1, 2, 1, 130, 130, 64, 64, 1),
]


@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=str)
@pytest.mark.parametrize("padding", [False, True])
def test_dense_softcap_is_gemma2_attention(shape, padding):
    b, hq, hkv, sq, sk, d, bs, causal = shape
    rng = np.random.default_rng(sq + sk + padding)
    q, k, v = random_qkv(rng, b, hq, hkv, sq, sk, d, d)
    q *= 6.0  # scores well past the cap, so that capping changes the result
    mask = rng.random((b, 1, 1, sk)) < 0.85 if padding else None
    if mask is not None:
        mask[..., -1] = True  # every row keeps a key
    attrs = dict(SPARSE_OFF, threshold=1.0, block_size=bs, is_causal=causal, softcap=5.0)
    y, density = run_op(q, k, v, mask, **attrs)
    expected = capped_attention(q, k, v, 5.0, mask, bool(causal))
    np.testing.assert_allclose(y, expected, atol=2e-5, rtol=1e-4)
    y_ref, _ = sparse_attention(q, k, v, mask, **attrs)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-4)
    (uncapped, _) = run_op(q, k, v, mask, **(attrs | {"softcap": 0.0}))
    assert np.abs(uncapped - y).max() > 1e-2, "the cap should change these scores"


# the three estimates with a threshold (the cap flattens the estimated mass, so it changes how
# many blocks the threshold needs) and with a cap alone
SPARSE_CASES = [
    ((1, 2, 1, 512, 512, 32, 64, 1), dict(threshold=0.6)),
    ((2, 2, 2, 300, 300, 24, 32, 0), dict(threshold=0.5, max_density=0.5)),
    ((1, 2, 1, 96, 480, 32, 32, 1), dict(threshold=0.7)),
]


@pytest.mark.parametrize("estimate", [0, 1, 2])
@pytest.mark.parametrize("shape,attrs", SPARSE_CASES, ids=str)
def test_sparse_softcap_matches_reference(shape, attrs, estimate):
    b, hq, hkv, sq, sk, d, bs, causal = shape
    rng = np.random.default_rng(sq + estimate)
    q, k, v = random_qkv(rng, b, hq, hkv, sq, sk, d, d)
    # structured keys so that the estimate has preferences; large enough for the cap to bite
    k += 3 * rng.standard_normal((b, hkv, sk // bs + 1, d)).repeat(bs, axis=2)[:, :, :sk].astype(np.float32)
    q += 2 * rng.standard_normal((b, hq, sq // bs + 1, d)).repeat(bs, axis=2)[:, :, :sq].astype(np.float32)
    full = dict(SPARSE_OFF, block_size=bs, is_causal=causal, estimate=estimate, softcap=3.0) | attrs
    y, density = run_op(q, k, v, **full)
    y_ref, density_ref = sparse_attention(q, k, v, None, **full)
    np.testing.assert_allclose(density, density_ref, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-4)
    _, uncapped_density = sparse_attention(q, k, v, None, **(full | {"softcap": 0.0}))
    assert density.max() < 1.0, "a sparse setting should skip blocks"
    assert not np.array_equal(density_ref, uncapped_density), "the cap should move the selection"


def test_softcap_comes_before_the_bias_and_in_float16():
    # A bias past the cap is added after capping: with the bias inside the tanh the result differs.
    rng = np.random.default_rng(5)
    q, k, v = random_qkv(rng, 1, 2, 1, 70, 70, 16, 16, np.float16)
    bias = (8.0 * rng.standard_normal((1, 2, 70, 70))).astype(np.float32)
    attrs = dict(SPARSE_OFF, threshold=1.0, block_size=16, is_causal=1, softcap=2.0)
    y, _ = run_op_with_bias(q, k, v, None, bias, **attrs)
    y_ref, _ = sparse_attention(q, k, v, None, bias, **attrs)
    np.testing.assert_allclose(y.astype(np.float32), y_ref.astype(np.float32), atol=2e-3)


@pytest.mark.parametrize("value", [-1.0, float("inf"), float("nan")])
def test_softcap_out_of_range_is_an_error(value):
    q = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(Exception, match=r"softcap must be a finite float in \[0, inf\)"):
        run_op(q, q, q, softcap=value)


def test_infinite_scores_are_capped_not_nan():
    # An infinite key element: its scores are +-inf before the cap, +-softcap after it, so
    # the rows stay finite and equal the reference (without the cap +inf makes them NaN).
    rng = np.random.default_rng(9)
    q, k, v = random_qkv(rng, 1, 1, 1, 20, 20, 8, 8)
    k[0, 0, 3, 0] = np.inf
    attrs = dict(SPARSE_OFF, threshold=1.0, block_size=8, softcap=4.0)
    y, _ = run_op(q, k, v, **attrs)
    y_ref, _ = sparse_attention(q, k, v, **attrs)
    assert np.isfinite(y_ref).all()
    np.testing.assert_allclose(y, y_ref, atol=2e-5)
