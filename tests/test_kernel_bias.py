"""attn_bias (the op's 5th input) on the CPU kernel against the numpy reference."""

from __future__ import annotations

import functools

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

import tfsa_onnx
from tfsa_onnx.opmodel import sparse_attention_model
from tfsa_onnx.reference import sparse_attention

SPARSE_OFF = dict(global_tokens=0, local_window=0, min_seq_len=0)
DENSE = dict(threshold=1.0, max_density=1.0, **SPARSE_OFF)
ONNX_TYPE = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.bool_: TensorProto.BOOL}


@functools.cache
def _session(attrs: tuple, dtype: type, mask: tuple | None, bias: tuple):
    mask_dtype, mask_rank = (ONNX_TYPE[mask[0]], mask[1]) if mask else (None, 4)
    model = sparse_attention_model(
        ONNX_TYPE[dtype],
        mask_dtype,
        mask_rank,
        bias_dtype=ONNX_TYPE[bias[0]],
        bias_rank=bias[1],
        **dict(attrs),
    )
    so = tfsa_onnx.session_options()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_op(q, k, v, mask, bias, **attrs):
    mask_key = (mask.dtype.type, mask.ndim) if mask is not None else None
    session = _session(tuple(sorted(attrs.items())), q.dtype.type, mask_key, (bias.dtype.type, bias.ndim))
    feeds = {"query": q, "key": k, "value": v, "attn_bias": bias}
    if mask is not None:
        feeds["attn_mask"] = mask
    return session.run(None, feeds)


def qkv(rng, b, hq, hkv, sq, sk, d, dv, dtype=np.float32):
    shapes = ((b, hq, sq, d), (b, hkv, sk, d), (b, hkv, sk, dv))
    return tuple(rng.standard_normal(s).astype(dtype) for s in shapes)


def plain_attention(q, k, v, add):
    """softmax(QK^T / sqrt(D) + add) V in float64, GQA heads repeated."""
    group = q.shape[1] // k.shape[1]
    k, v = (np.repeat(t.astype(np.float64), group, axis=1) for t in (k, v))
    s = q.astype(np.float64) @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1]) + add
    w = np.exp(s - s.max(axis=-1, keepdims=True))
    return (w / w.sum(axis=-1, keepdims=True)) @ v


# bias shape for [B=2, H=4, Sq, Sk]: per head, per batch, per row broadcast (ALiBi), full, rank 2
BIAS_SHAPES = [(1, 4, 37, 53), (2, 1, 37, 53), (2, 4, 1, 53), (2, 4, 37, 53), (37, 53), (1, 1, 37, 1)]


@pytest.mark.parametrize("bias_shape", BIAS_SHAPES, ids=str)
def test_dense_bias_is_added_to_the_scores(bias_shape):
    rng = np.random.default_rng(len(bias_shape) + bias_shape[-1])
    q, k, v = qkv(rng, 2, 4, 2, 37, 53, 16, 8)
    bias = (3 * rng.standard_normal(bias_shape)).astype(np.float32)
    y, density = run_op(q, k, v, None, bias, block_size=16, **DENSE)
    np.testing.assert_allclose(y, plain_attention(q, k, v, bias), atol=2e-5)
    np.testing.assert_array_equal(density, 1.0)


@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("mask_kind", [None, "padding", "additive-per-query"])
@pytest.mark.parametrize("bias_shape", [(1, 4, 70, 70), (2, 4, 1, 70), (2, 1, 70, 70)], ids=str)
def test_sparse_settings_with_bias_match_reference(causal, mask_kind, bias_shape):
    rng = np.random.default_rng(7 * causal + len(str(mask_kind)))
    q, k, v = qkv(rng, 2, 4, 2, 70, 70, 16, 16)
    bias = (4 * rng.standard_normal(bias_shape)).astype(np.float32)
    mask = None
    if mask_kind == "padding":
        mask = np.ones((2, 1, 1, 70), bool)
        mask[1, ..., 45:] = False
    elif mask_kind:
        mask = np.where(rng.random((2, 1, 70, 70)) < 0.2, -np.inf, rng.standard_normal((2, 1, 70, 70)))
        mask = mask.astype(np.float32)
    attrs = dict(block_size=16, is_causal=causal, threshold=0.7, max_density=0.6, **SPARSE_OFF)
    y, density = run_op(q, k, v, mask, bias, **attrs)
    y_ref, density_ref = sparse_attention(q, k, v, mask, bias, **attrs)
    np.testing.assert_allclose(density, density_ref, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, atol=5e-5, rtol=1e-4)


def test_the_estimate_sees_the_bias_at_block_centres():
    # Keys alike, the bias strongly favours key block 3 for every query: with room for one
    # estimated block, each query block takes block 3.
    rng = np.random.default_rng(11)
    q, k, v = qkv(rng, 1, 1, 1, 64, 64, 8, 8)
    k[:] = k[:, :, :1]
    bias = np.zeros((1, 1, 64, 64), np.float32)
    bias[..., 48:] = 20.0
    attrs = dict(block_size=16, threshold=0.5, max_density=0.25, **SPARSE_OFF)
    y, density = run_op(q, k, v, None, bias, **attrs)
    y_ref, density_ref = sparse_attention(q, k, v, None, bias, **attrs)
    np.testing.assert_allclose(density, 0.25)
    np.testing.assert_allclose(y, y_ref, atol=2e-5)
    np.testing.assert_allclose(
        y, np.broadcast_to(v[:, :, 48:].mean(axis=2, keepdims=True), y.shape), atol=1e-4
    )


def test_minus_inf_bias_hides_pairs_without_closing_blocks():
    rng = np.random.default_rng(12)
    q, k, v = qkv(rng, 1, 2, 2, 40, 40, 8, 8)
    bias = np.zeros((1, 2, 40, 40), np.float32)
    bias[:, :, :, :20] = -np.inf  # the first half of the keys, for every row
    bias[:, 1, 5, :] = -np.inf  # row 5 of head 1 sees nothing: zeros
    attrs = dict(block_size=8, **DENSE)
    y, density = run_op(q, k, v, None, bias, **attrs)
    y_ref, density_ref = sparse_attention(q, k, v, None, bias, **attrs)
    np.testing.assert_allclose(y, y_ref, atol=2e-5)
    np.testing.assert_array_equal(y[0, 1, 5], 0.0)
    np.testing.assert_array_equal(density, density_ref)  # every block still counts as allowed


def test_bias_of_a_masked_pair_is_not_read():
    # +inf or NaN in the bias where the mask hides the pair changes nothing; where the pair
    # counts, NaN makes that row NaN and no other.
    rng = np.random.default_rng(13)
    q, k, v = qkv(rng, 1, 1, 1, 24, 24, 8, 8)
    mask = np.ones((1, 1, 1, 24), bool)
    mask[..., 20:] = False
    bias = np.zeros((1, 1, 24, 24), np.float32)
    bias[..., 20:] = np.nan
    bias[0, 0, 3, 21] = np.inf
    attrs = dict(block_size=8, **DENSE)
    y, _ = run_op(q, k, v, mask, bias, **attrs)
    np.testing.assert_allclose(y, sparse_attention(q, k, v, mask, **attrs)[0], atol=2e-5)
    bias[0, 0, 7, 2] = np.nan
    y, _ = run_op(q, k, v, mask, bias, **attrs)
    assert np.isnan(y[0, 0, 7]).all() and not np.isnan(np.delete(y[0, 0], 7, axis=0)).any()


@pytest.mark.parametrize("bias_dtype", [np.float16, np.float32])
def test_float16_queries_with_float16_or_float32_bias(bias_dtype):
    rng = np.random.default_rng(14)
    q, k, v = qkv(rng, 1, 4, 2, 100, 130, 64, 64, np.float16)
    bias = (2 * rng.standard_normal((1, 4, 100, 130))).astype(bias_dtype)
    attrs = dict(block_size=32, is_causal=1, threshold=0.8, max_density=0.7, **SPARSE_OFF)
    y, density = run_op(q, k, v, None, bias, **attrs)
    y_ref, density_ref = sparse_attention(q, k, v, None, bias, **attrs)
    assert y.dtype == np.float16
    np.testing.assert_allclose(density, density_ref, atol=1e-6)
    np.testing.assert_allclose(y.astype(np.float32), y_ref.astype(np.float32), atol=3e-3)


@pytest.mark.parametrize("seed", range(12))
def test_random_configurations_with_bias_match_reference(seed):
    rng = np.random.default_rng(5000 + seed)
    hkv = int(rng.integers(1, 3))
    hq, b = hkv * int(rng.integers(1, 3)), int(rng.integers(1, 3))
    sk = int(rng.integers(1, 200))
    sq = int(rng.integers(1, sk + 1)) if rng.random() < 0.4 else sk
    q, k, v = qkv(rng, b, hq, hkv, sq, sk, int(rng.integers(1, 40)), int(rng.integers(1, 40)))
    shape = [d if rng.random() < 0.6 else 1 for d in (b, hq, sq, sk)]
    bias = (3 * rng.standard_normal(shape)).astype(np.float32)
    mask = (rng.random((b, 1, 1, sk)) < 0.8) if rng.random() < 0.5 else None
    attrs = dict(
        block_size=int(rng.choice([1, 7, 16, 50])),
        is_causal=int(rng.integers(0, 2)),
        global_tokens=int(rng.choice([0, 5])),
        local_window=int(rng.choice([0, 10])),
        threshold=float(rng.choice([0.5, 0.9, 1.0])),
        max_density=float(rng.choice([0.25, 0.75, 1.0])),
        min_seq_len=0,
    )
    y, density = run_op(q, k, v, mask, bias, **attrs)
    y_ref, density_ref = sparse_attention(q, k, v, mask, bias, **attrs)
    np.testing.assert_allclose(density, density_ref, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "bias_shape,words",
    [
        ((1, 3, 8, 8), "attn_bias does not broadcast"),
        ((1, 2, 8, 7), "attn_bias does not broadcast"),
        ((1, 1, 2, 8, 8), "attn_bias must have rank <= 4"),
    ],
)
def test_bias_of_the_wrong_shape_is_an_error_naming_the_shapes(bias_shape, words):
    q = np.zeros((1, 2, 8, 4), np.float32)
    with pytest.raises(Exception, match=words) as info:
        run_op(q, q, q, None, np.zeros(bias_shape, np.float32), **DENSE)
    assert "attn_bias" + str(list(bias_shape)).replace(" ", "") in str(info.value).replace(" ", "")


def test_bias_of_another_type_is_an_error():
    q = np.zeros((1, 2, 8, 4), np.float32)
    with pytest.raises(Exception, match="attn_bias must be float32 or float32"):
        run_op(q, q, q, None, np.zeros((1, 2, 8, 8), np.float16), **DENSE)
    q16 = q.astype(np.float16)
    with pytest.raises(Exception, match="attn_bias must be float32 or float16 like query, got bool"):
        run_op(q16, q16, q16, None, np.zeros((1, 2, 8, 8), bool), **DENSE)


def test_bias_is_read_only_inside_the_computed_blocks():
    # threshold 0: only the global block (key block 0) and query block 0's row are computed;
    # NaN biases everywhere else never reach an output (the estimate counts NaN as 0).
    rng = np.random.default_rng(15)
    q, k, v = qkv(rng, 1, 2, 1, 64, 64, 8, 8)
    bias = (2 * rng.standard_normal((1, 2, 64, 64))).astype(np.float32)
    bias[:, :, 16:, 16:] = np.nan
    attrs = dict(block_size=16, global_tokens=16, local_window=0, threshold=0.0, min_seq_len=0)
    y, density = run_op(q, k, v, None, bias, **attrs)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(density, (4 + 3) / 16)
    np.testing.assert_allclose(y, sparse_attention(q, k, v, None, bias, **attrs)[0], atol=2e-5)


@pytest.mark.parametrize("sq", [1, 3])
def test_few_query_rows_with_bias(sq):
    # Up to 4 rows, dense, no mask: the few-rows path, which a bias turns off (it adds none).
    rng = np.random.default_rng(16 + sq)
    q, k, v = qkv(rng, 2, 4, 2, sq, 50, 16, 8)
    bias = (3 * rng.standard_normal((2, 4, 1, 50))).astype(np.float32)
    y, _ = run_op(q, k, v, None, bias, block_size=16, **DENSE)
    np.testing.assert_allclose(y, plain_attention(q, k, v, bias), atol=2e-5)
