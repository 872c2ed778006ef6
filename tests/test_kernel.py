"""The CPU kernel of ai.tfsa::SparseAttention against the numpy reference (the spec)."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import bfloat16
import numpy as np
import onnxruntime as ort
import pytest
from contract_rows import check_mirror, library_rows
from onnx import TensorProto

import tfsa_onnx
from tfsa_onnx import cuda
from tfsa_onnx.config import BOUNDS
from tfsa_onnx.opmodel import sparse_attention_model
from tfsa_onnx.reference import (
    ATTRIBUTE_BOUNDS,
    BLOCK_SIZE_MAX,
    ESTIMATE_STRIDE_MAX,
    HEAD_THRESHOLDS_MAX,
    TOKENS_MAX,
    SparseAttentionAttributes,
    select_blocks,
    sparse_attention,
)

SPARSE_OFF = dict(global_tokens=0, local_window=0, min_seq_len=0)


@functools.cache
def _session(attrs: tuple, dtype: int, mask_dtype: int | None, mask_rank: int, threads: int, density: bool):
    model = sparse_attention_model(dtype, mask_dtype, mask_rank, density_output=density, **dict(attrs))
    so = tfsa_onnx.session_options()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_op(q, k, v, mask=None, threads: int = 2, density: bool = True, **attrs):
    dtype = TensorProto.FLOAT16 if q.dtype == np.float16 else TensorProto.FLOAT
    mask_dtype = None
    if mask is not None:
        mask_dtype = TensorProto.BOOL if mask.dtype == np.bool_ else dtype
    rank = mask.ndim if mask is not None else 4
    session = _session(tuple(sorted(attrs.items())), dtype, mask_dtype, rank, threads, density)
    feeds = {"query": q, "key": k, "value": v}
    if mask is not None:
        feeds["attn_mask"] = mask
    return session.run(None, feeds)


def random_qkv(rng, b, hq, hkv, sq, sk, d, dv, dtype=np.float32):
    q = rng.standard_normal((b, hq, sq, d)).astype(dtype)
    k = rng.standard_normal((b, hkv, sk, d)).astype(dtype)
    v = rng.standard_normal((b, hkv, sk, dv)).astype(dtype)
    return q, k, v


def dense_attention(q, k, v, mask=None, causal=False, scale=None):
    """Plain softmax attention, independent of the reference's block machinery."""
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k.astype(np.float64), group, axis=1)
    v = np.repeat(v.astype(np.float64), group, axis=1)
    s = (scale or 1 / np.sqrt(q.shape[-1])) * q.astype(np.float64) @ np.swapaxes(k, -1, -2)
    if mask is not None:
        s = s + (np.where(mask, 0, -np.inf) if mask.dtype == np.bool_ else mask)
    if causal:
        sq, sk = s.shape[-2:]
        s = np.where(np.arange(sk)[None] <= np.arange(sq)[:, None] + sk - sq, s, -np.inf)
    with np.errstate(invalid="ignore"):  # fully masked rows: -inf - -inf
        p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


# (batch, q_heads, kv_heads, q_len, kv_len, head_dim, v_head_dim, block_size, causal)
DENSE_SHAPES = [
    (1, 1, 1, 1, 1, 1, 1, 64, 0),
    (1, 2, 2, 1, 1, 8, 8, 64, 1),
    (2, 4, 2, 64, 64, 64, 64, 64, 0),
    (1, 3, 1, 100, 100, 40, 24, 16, 1),
    (1, 2, 1, 257, 257, 7, 9, 32, 1),
    (2, 2, 2, 33, 95, 33, 17, 8, 0),
    (1, 4, 4, 5, 300, 96, 96, 64, 1),  # Sq < Sk: queries sit at the end
    (1, 2, 1, 130, 130, 130, 3, 128, 0),
    (1, 1, 1, 77, 77, 64, 64, 1, 1),
    (1, 6, 3, 129, 129, 64, 64, 3, 0),
    (3, 2, 1, 70, 1, 16, 16, 64, 0),
]


@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dense_settings_match_plain_attention(shape):
    b, hq, hkv, sq, sk, d, dv, bs, causal = shape
    q, k, v = random_qkv(np.random.default_rng(hash(shape) % 2**32), b, hq, hkv, sq, sk, d, dv)
    attrs = dict(block_size=bs, is_causal=causal, threshold=1.0, max_density=1.0, **SPARSE_OFF)
    y, density = run_op(q, k, v, **attrs)
    np.testing.assert_allclose(y, dense_attention(q, k, v, causal=bool(causal)), atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(density, np.ones((b, hq), np.float32))


# (shape, attributes): selection by threshold, by cap, with global and local blocks
SPARSE_CASES = [
    ((1, 2, 1, 512, 512, 64, 64, 64, 1), dict(threshold=0.5, max_density=1.0)),
    ((1, 2, 2, 512, 512, 32, 32, 32, 0), dict(threshold=1.0, max_density=0.25)),
    ((2, 4, 2, 300, 300, 48, 40, 32, 1), dict(threshold=0.75, max_density=0.5)),
    ((1, 2, 1, 400, 400, 64, 64, 64, 0), dict(threshold=0.5, max_density=0.5, global_tokens=64)),
    ((1, 1, 1, 640, 640, 16, 16, 64, 1), dict(threshold=0.25, max_density=1.0, local_window=100)),
    (
        (1, 2, 1, 333, 333, 24, 24, 50, 0),
        dict(threshold=0.875, max_density=0.375, global_tokens=10, local_window=30),
    ),
    ((1, 2, 2, 96, 480, 32, 32, 32, 1), dict(threshold=0.5, max_density=0.5)),
]


@pytest.mark.parametrize("shape,attrs", SPARSE_CASES, ids=lambda x: str(x))
def test_sparse_settings_match_reference(shape, attrs):
    b, hq, hkv, sq, sk, d, dv, bs, causal = shape
    rng = np.random.default_rng(sq * 7 + d)
    q, k, v = random_qkv(rng, b, hq, hkv, sq, sk, d, dv)
    # Structured keys so the estimate has real preferences, not ties of noise.
    k += 3 * rng.standard_normal((b, hkv, sk // bs + 1, d)).repeat(bs, axis=2)[:, :, :sk].astype(np.float32)
    full = dict(SPARSE_OFF, min_seq_len=0, block_size=bs, is_causal=causal) | attrs
    y, density = run_op(q, k, v, **full)
    y_ref, density_ref = sparse_attention(q, k, v, None, **full)
    np.testing.assert_allclose(density, density_ref, atol=1e-6)
    assert density.max() < 1.0, "a sparse setting should skip blocks"
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-4)


# the antidiagonal estimate at a few strides (1: every pair; past the sequence: none), and token
OTHER_ESTIMATES = [
    dict(estimate=1),
    dict(estimate=1, estimate_stride=1),
    dict(estimate=1, estimate_stride=5),
    dict(estimate=1, estimate_stride=1024),
    dict(estimate=2),
]


@pytest.mark.parametrize("estimate", OTHER_ESTIMATES, ids=str)
@pytest.mark.parametrize("shape,attrs", SPARSE_CASES, ids=lambda x: str(x))
def test_other_estimates_match_reference(shape, attrs, estimate):
    b, hq, hkv, sq, sk, d, dv, bs, causal = shape
    rng = np.random.default_rng(sq * 5 + d)
    q, k, v = random_qkv(rng, b, hq, hkv, sq, sk, d, dv)
    k += 3 * rng.standard_normal((b, hkv, sk // bs + 1, d)).repeat(bs, axis=2)[:, :, :sk].astype(np.float32)
    full = dict(SPARSE_OFF, min_seq_len=0, block_size=bs, is_causal=causal, **estimate) | attrs
    y, density = run_op(q, k, v, **full)
    y_ref, density_ref = sparse_attention(q, k, v, None, **full)
    np.testing.assert_allclose(density, density_ref, atol=1e-6)
    assert density.max() < 1.0, "a sparse setting should skip blocks"
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("stride", [16, 24])
def test_antidiagonal_groups_of_query_blocks_match_reference(stride):
    # The CPU kernel scores the antidiagonal estimate for 16 query blocks at once here (block 32,
    # stride 16): 35 blocks make two full groups and a ragged one. A mask closes some blocks
    # below the causal edge (their samples are hidden row by row), and stride 24 does not
    # divide the block (samples summed into blocks residue by residue).
    rng = np.random.default_rng(stride)
    q, k, v = random_qkv(rng, 1, 4, 2, 1100, 1100, 32, 16)
    k += 3 * rng.standard_normal((1, 2, 35, 32)).repeat(32, axis=2)[:, :, :1100].astype(np.float32)
    open_blocks = rng.random((1, 4, 35, 35)) < 0.8
    mask = open_blocks.repeat(32, axis=2).repeat(32, axis=3)[:, :, :1100, :1100]
    mask[..., 0] = True  # every row keeps a key
    attrs = dict(SPARSE_OFF, block_size=32, is_causal=1, threshold=0.7, estimate=1, estimate_stride=stride)
    y, density = run_op(q, k, v, mask, **attrs)
    y_ref, density_ref = sparse_attention(q, k, v, mask, **attrs)
    np.testing.assert_allclose(density, density_ref, atol=1e-6)
    assert density.max() < 1.0
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("head_dim", [32, 8])  # 32: AMX where the CPU has it; 8: float32 products
def test_antidiagonal_estimate_takes_bf16_operands(head_dim):
    # Key block 0 scores above block 1 in float32 (by 2^-19) but below it once q and k are
    # rounded to bf16 (1 + 2^-8 - 2^-20 rounds down to 1, 1 + 2^-8 + 2^-20 up to 1 + 2^-7): the
    # kernel and the reference pick block 1, whose values are all 1; block 2's keys are zeros.
    eps = 2.0**-20
    q = np.zeros((1, 1, 16, head_dim), np.float32)
    q[..., :2] = 1.0
    k = np.zeros((1, 1, 48, head_dim), np.float32)
    k[..., :16, 0], k[..., :16, 1] = 1 + 2.0**-8 - eps, 4 * eps
    k[..., 16:32, 0] = 1 + 2.0**-8 + eps
    v = np.zeros((1, 1, 48, 4), np.float32)
    v[..., 16:32, :] = 1.0
    attrs = dict(SPARSE_OFF, block_size=16, scale=1.0, threshold=1.0, max_density=1 / 3, estimate=1)
    for stride in (1, 2):
        y, density = run_op(q, k, v, **attrs, estimate_stride=stride)
        y_ref, _ = sparse_attention(q, k, v, **attrs, estimate_stride=stride)
        np.testing.assert_allclose(density, 1 / 3, atol=1e-6)
        np.testing.assert_allclose(y, 1.0, atol=1e-6)
        np.testing.assert_allclose(y, y_ref, atol=1e-6)


def test_the_estimate_attribute_chooses_the_kernels_estimate():
    # A case where the two estimates pick different blocks for the last query block (one of
    # its rows aimed at key block 5): the kernel follows the reference under each.
    rng = np.random.default_rng(0)
    q, k, v = random_qkv(rng, 1, 1, 1, 512, 512, 32, 16)
    k += rng.standard_normal((1, 1, 8, 32)).repeat(64, axis=2).astype(np.float32)
    aim = k[0, 0, 320:384].mean(axis=0)
    q[0, 0, 448 + 17] = 12 * np.sqrt(32) * aim / (aim @ aim)
    attrs = dict(SPARSE_OFF, min_seq_len=0, block_size=64, threshold=1.0, max_density=0.125)
    picks, outputs = [], []
    for estimate in (0, 2):
        a = SparseAttentionAttributes(**attrs, estimate=estimate)
        picks.append(np.flatnonzero(select_blocks(q, k, np.ones((1, 1, 8, 8), bool), a)[0, 0, 7]))
        y, _ = run_op(q, k, v, **attrs, estimate=estimate)
        y_ref, _ = sparse_attention(q, k, v, **attrs, estimate=estimate)
        np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-4)
        outputs.append(y)
    assert len(picks[0]) == len(picks[1]) == 1 and picks[0] != picks[1], picks
    assert not np.allclose(outputs[0][0, 0, 448:], outputs[1][0, 0, 448:])


def test_bool_padding_mask_and_fully_masked_rows_give_zeros():
    rng = np.random.default_rng(1)
    q, k, v = random_qkv(rng, 2, 2, 2, 40, 40, 16, 16)
    mask = np.ones((2, 1, 40, 40), bool)
    mask[0, :, :, 30:] = False  # padding
    mask[1, :, 5, :] = False  # a query that sees nothing
    y, _ = run_op(q, k, v, mask, block_size=16, threshold=1.0, max_density=1.0, **SPARSE_OFF)
    assert not np.isnan(y).any()
    np.testing.assert_array_equal(y[1, :, 5], 0)
    expected = dense_attention(q, k, v, mask)
    expected[1, :, 5] = 0
    np.testing.assert_allclose(y, expected, atol=2e-5)


@pytest.mark.parametrize("mask_shape", [(40, 48), (2, 1, 1, 48), (1, 2, 40, 48), (48,), (2, 2, 40, 48)])
def test_additive_mask_broadcasts(mask_shape):
    rng = np.random.default_rng(2)
    q, k, v = random_qkv(rng, 2, 2, 1, 40, 48, 16, 8)
    mask = rng.standard_normal(mask_shape).astype(np.float32)
    mask[..., :3] = -np.inf
    attrs = dict(block_size=16, threshold=1.0, max_density=1.0, **SPARSE_OFF)
    y, _ = run_op(q, k, v, mask, **attrs)
    np.testing.assert_allclose(y, dense_attention(q, k, v, mask), atol=2e-5)
    np.testing.assert_allclose(y, sparse_attention(q, k, v, mask, **attrs)[0], atol=2e-5)


def test_masked_key_blocks_are_never_chosen_and_not_counted():
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(rng, 1, 2, 2, 256, 256, 32, 32)
    mask = np.ones((1, 1, 1, 256), bool)
    mask[..., 128:] = False  # half the key blocks are padding
    attrs = dict(block_size=32, threshold=1.0, max_density=0.5, **SPARSE_OFF)
    y, density = run_op(q, k, v, mask, **attrs)
    y_ref, density_ref = sparse_attention(q, k, v, mask, **attrs)
    np.testing.assert_allclose(density, 0.5, atol=1e-6)  # 2 of the 4 attendable blocks
    np.testing.assert_allclose(density, density_ref)
    np.testing.assert_allclose(y, y_ref, atol=2e-5)


@pytest.mark.parametrize("causal", [0, 1])
def test_per_query_masks_with_sparse_settings_match_reference(causal):
    rng = np.random.default_rng(10 + causal)
    q, k, v = random_qkv(rng, 2, 2, 1, 150, 150, 16, 16)
    mask = rng.random((2, 2, 150, 150)) < 0.3
    mask[:, :, :, 64:96] = False  # whole key blocks closed
    mask[0, 1, 40:, :] &= np.tril(np.ones((150, 150), bool), -8)[40:]  # closed only near the diagonal
    attrs = dict(block_size=32, is_causal=causal, threshold=0.75, max_density=0.75, **SPARSE_OFF)
    y, density = run_op(q, k, v, mask, **attrs)
    y_ref, density_ref = sparse_attention(q, k, v, mask, **attrs)
    np.testing.assert_allclose(density, density_ref, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, atol=2e-5)
    additive = np.where(mask, rng.standard_normal(mask.shape), -np.inf).astype(np.float32)
    y, density = run_op(q, k, v, additive, **attrs)
    y_ref, density_ref = sparse_attention(q, k, v, additive, **attrs)
    np.testing.assert_allclose(density, density_ref, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, atol=2e-5)


def test_float16():
    rng = np.random.default_rng(4)
    q, k, v = random_qkv(rng, 1, 4, 2, 200, 200, 64, 64, np.float16)
    mask = np.where(rng.random((1, 1, 1, 200)) < 0.1, -np.inf, 0).astype(np.float16)
    attrs = dict(block_size=64, is_causal=1, threshold=1.0, max_density=1.0, **SPARSE_OFF)
    y, _ = run_op(q, k, v, mask, **attrs)
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float32), dense_attention(q, k, v, mask, causal=True), atol=3e-3)


def test_bfloat16():
    # numpy has no bfloat16: feed and read the raw 16-bit patterns through OrtValues.
    rng = np.random.default_rng(41)
    q, k, v = (bfloat16.rounded(x) for x in random_qkv(rng, 1, 2, 1, 70, 70, 16, 16))
    attrs = dict(block_size=16, is_causal=1, threshold=1.0, max_density=1.0, **SPARSE_OFF)
    session = _session(tuple(sorted(attrs.items())), TensorProto.BFLOAT16, None, 4, 2, True)
    binding = session.io_binding()
    for name, x in (("query", q), ("key", k), ("value", v)):
        value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bfloat16.to_bits(x), TensorProto.BFLOAT16)
        binding.bind_ortvalue_input(name, value)
    y_bits = np.zeros((1, 2, 70, 16), np.uint16)
    binding.bind_ortvalue_output(
        "Y", ort.OrtValue.ortvalue_from_numpy_with_onnx_type(y_bits, TensorProto.BFLOAT16)
    )
    binding.bind_output("density")
    session.run_with_iobinding(binding)
    expected = dense_attention(q, k, v, causal=True)
    np.testing.assert_allclose(bfloat16.from_bits(y_bits), expected, atol=1e-2)


def test_nan_propagates_without_crashing():
    rng = np.random.default_rng(5)
    q, k, v = random_qkv(rng, 2, 2, 2, 64, 64, 16, 16)
    q[0, 0, 3, 0] = np.nan
    v[0, 1, 10, :] = np.nan
    for attrs in (dict(threshold=1.0, max_density=1.0), dict(threshold=0.5, max_density=0.5)):
        y, density = run_op(q, k, v, block_size=16, **attrs, **SPARSE_OFF)
        assert np.isnan(y[0, 0, 3]).all()
        assert np.isnan(y[0, 1]).any()
        assert not np.isnan(y[1]).any(), "NaN must not leak into other batch rows"
        assert np.isfinite(density).all()


def test_min_seq_len_computes_dense():
    rng = np.random.default_rng(6)
    q, k, v = random_qkv(rng, 1, 2, 2, 256, 256, 32, 32)
    sparse = dict(block_size=32, threshold=0.1, max_density=0.1, global_tokens=0, local_window=0)
    y, density = run_op(q, k, v, min_seq_len=257, **sparse)
    np.testing.assert_allclose(y, dense_attention(q, k, v), atol=2e-5)
    np.testing.assert_array_equal(density, 1.0)
    _, density = run_op(q, k, v, min_seq_len=256, **sparse)
    assert density.max() < 0.5


def test_thread_count_does_not_change_results():
    rng = np.random.default_rng(7)
    q, k, v = random_qkv(rng, 2, 3, 1, 300, 300, 32, 32)
    attrs = dict(block_size=32, is_causal=1, threshold=0.75, max_density=0.5, **SPARSE_OFF)
    y1, d1 = run_op(q, k, v, threads=1, **attrs)
    y2, d2 = run_op(q, k, v, threads=2, **attrs)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(d1, d2)


def test_density_output_is_optional():
    rng = np.random.default_rng(8)
    q, k, v = random_qkv(rng, 1, 1, 1, 16, 16, 8, 8)
    (y,) = run_op(q, k, v, density=False, block_size=8, **SPARSE_OFF)
    np.testing.assert_allclose(y, dense_attention(q, k, v), atol=2e-5)


def test_default_attributes_are_the_references():
    rng = np.random.default_rng(9)
    q, k, v = random_qkv(rng, 1, 2, 1, 1100, 1100, 16, 16)
    y, density = run_op(q, k, v)  # no attributes: the op's defaults
    y_ref, density_ref = sparse_attention(q, k, v)
    np.testing.assert_allclose(density, density_ref)
    np.testing.assert_allclose(y, y_ref, atol=2e-5)


def test_attributes_agree_with_the_cpp_contract():
    # The library reports contract.h's attribute table (tfsa_attribute_info): the Python mirror
    # must have the same names in the struct's order, the same defaults and the same bounds,
    # and the ctypes struct the same field offsets. The CUDA library exports the same table.
    rows = library_rows("tfsa_attribute_info")
    check_mirror(rows, SparseAttentionAttributes, ATTRIBUTE_BOUNDS)
    if (Path(tfsa_onnx.__file__).parent / "libtfsa_ops_cuda.so").is_file():
        cuda_rows = library_rows("tfsa_attribute_info", tfsa_onnx.get_library_path("cuda"))
        assert [(i.name, i.offset, i.default_value) for i in cuda_rows] == [
            (i.name, i.offset, i.default_value) for i in rows
        ]
    for info in rows:
        assert info.offset == getattr(cuda.Attributes, info.name.decode()).offset, info.name

    # a list is max_count floats and then its int64 count (head_thresholds: HEAD_THRESHOLDS_MAX);
    # the struct ends with its last field (8-byte aligned)
    def size(info) -> int:
        return 4 * info.max_count + 8 if info.max_count else 4 if info.is_float else 8

    last = max(rows, key=lambda info: info.offset)
    assert ctypes.sizeof(cuda.Attributes) == -(-(last.offset + size(last)) // 8) * 8
    lists = [i for i in rows if i.max_count]
    assert [(i.name.decode(), i.max_count) for i in lists] == [("head_thresholds", HEAD_THRESHOLDS_MAX)]
    assert cuda.Attributes.head_threshold_count.offset == lists[0].offset + 4 * HEAD_THRESHOLDS_MAX
    assert ATTRIBUTE_BOUNDS["block_size"][1] == BLOCK_SIZE_MAX
    assert ATTRIBUTE_BOUNDS["global_tokens"][1] == TOKENS_MAX
    assert ATTRIBUTE_BOUNDS["estimate_stride"][1] == ESTIMATE_STRIDE_MAX
    for name, bounds in BOUNDS.items():  # the config's checks agree too
        assert bounds == ATTRIBUTE_BOUNDS[name], name


# --- bad input: an ONNX Runtime error naming what is wrong, never a crash ---------------

BAD_SHAPES = [
    ((1, 2, 8, 4), (1, 2, 8), (1, 2, 8, 4), "4-D"),
    ((1, 2, 8, 4), (2, 2, 8, 4), (2, 2, 8, 4), "batch"),
    ((1, 2, 8, 4), (1, 2, 8, 5), (1, 2, 8, 4), "head_dim"),
    ((1, 3, 8, 4), (1, 2, 8, 4), (1, 2, 8, 4), "multiple"),
    ((1, 2, 8, 4), (1, 2, 8, 4), (1, 2, 9, 4), "value"),
]


@pytest.mark.parametrize("q_shape,k_shape,v_shape,words", BAD_SHAPES)
def test_bad_shapes_are_errors_that_name_the_shapes(q_shape, k_shape, v_shape, words):
    session = _session((), TensorProto.FLOAT, None, 4, 1, True)
    # Rank-3 inputs need a model without fixed ranks: build one with symbolic 4-D dims but
    # feed what the graph allows; mismatched sizes are what the kernel must catch.
    if len(k_shape) != 4:
        model = sparse_attention_model()
        model.graph.input[1].type.tensor_type.shape.dim.pop()
        session = ort.InferenceSession(model.SerializeToString(), tfsa_onnx.session_options())
    shapes = {"query": q_shape, "key": k_shape, "value": v_shape}
    feeds = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    with pytest.raises(Exception, match=words) as info:
        session.run(None, feeds)
    assert str(list(q_shape)).replace(" ", "") in str(info.value).replace(" ", "")


def test_mask_that_does_not_broadcast_is_an_error():
    q = np.zeros((1, 2, 8, 4), np.float32)
    with pytest.raises(Exception, match="attn_mask does not broadcast"):
        run_op(q, q, q, np.zeros((1, 3, 8, 8), np.float32))


def test_unsupported_dtype_is_an_error():
    # The kernels are registered per type (float32/float16/bfloat16), so ONNX Runtime itself
    # names the input and the type, already when the session is created.
    model = sparse_attention_model(TensorProto.DOUBLE)
    with pytest.raises(Exception, match=r"tensor\(double\).*\(query\)"):
        ort.InferenceSession(model.SerializeToString(), tfsa_onnx.session_options())
    q = np.zeros((1, 1, 4, 4), np.float32)
    session = _session((), TensorProto.FLOAT, None, 4, 1, True)
    with pytest.raises(Exception, match="float16"):
        session.run(None, {"query": q, "key": q.astype(np.float16), "value": q})
    session = _session((), TensorProto.FLOAT, TensorProto.INT32, 4, 1, True)
    with pytest.raises(Exception, match="attn_mask must be bool or float32"):
        session.run(None, {"query": q, "key": q, "value": q, "attn_mask": np.zeros((1, 1, 4, 4), np.int32)})


# Each attribute just outside its bounds (reference.py BLOCK_SIZE_MAX / TOKENS_MAX, the same
# as contract.h) and the range the message must name.
OUT_OF_RANGE = [
    ("block_size", 0, f"[1, {BLOCK_SIZE_MAX}]"),
    ("block_size", -4, f"[1, {BLOCK_SIZE_MAX}]"),
    ("block_size", BLOCK_SIZE_MAX + 1, f"[1, {BLOCK_SIZE_MAX}]"),
    ("block_size", 2**63 - 1, f"[1, {BLOCK_SIZE_MAX}]"),
    ("global_tokens", -1, f"[0, {TOKENS_MAX}]"),
    ("global_tokens", TOKENS_MAX + 1, f"[0, {TOKENS_MAX}]"),
    ("local_window", 2**63 - 2, f"[0, {TOKENS_MAX}]"),
    ("local_window", -1, f"[0, {TOKENS_MAX}]"),
    ("min_seq_len", TOKENS_MAX + 1, f"[0, {TOKENS_MAX}]"),
    ("min_seq_len", -(2**63), f"[0, {TOKENS_MAX}]"),
    ("is_causal", 2, "[0, 1]"),
    ("is_causal", -1, "[0, 1]"),
    ("threshold", -0.01, "[0, 1]"),
    ("threshold", 1.5, "[0, 1]"),
    ("threshold", float("nan"), "[0, 1]"),
    ("max_density", 0.0, "(0, 1]"),
    ("max_density", 1.01, "(0, 1]"),
    ("max_density", float("nan"), "(0, 1]"),
    ("scale", -1.0, "[0, inf)"),
    ("scale", float("inf"), "[0, inf)"),
    ("scale", float("nan"), "[0, inf)"),
    ("estimate", 3, "[0, 2]"),
    ("estimate", -1, "[0, 2]"),
    ("estimate_stride", 0, f"[1, {ESTIMATE_STRIDE_MAX}]"),
    ("estimate_stride", ESTIMATE_STRIDE_MAX + 1, f"[1, {ESTIMATE_STRIDE_MAX}]"),
    ("window_ahead", -2, f"[-1, {TOKENS_MAX}]"),
    ("window_ahead", TOKENS_MAX + 1, f"[-1, {TOKENS_MAX}]"),
]


@pytest.mark.parametrize("name,value,bounds", OUT_OF_RANGE)
def test_attributes_out_of_range_are_errors_naming_value_and_range(name, value, bounds):
    q = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(Exception) as info:
        run_op(q, q, q, **{name: value})
    message = str(info.value)
    assert f"{name} must be" in message and bounds in message, message
    shown = (
        "nan"
        if value != value
        else "inf"
        if value == float("inf")
        else f"{value:g}"
        if isinstance(value, float)
        else str(value)
    )
    assert f"got {shown}" in message, message


# Each bound itself is accepted, and gives the reference's result.
AT_THE_BOUNDS = [
    dict(block_size=1),
    dict(block_size=BLOCK_SIZE_MAX),
    dict(global_tokens=TOKENS_MAX),
    dict(local_window=TOKENS_MAX),
    dict(min_seq_len=TOKENS_MAX),
    dict(threshold=0.0, min_seq_len=0),
    dict(threshold=1.0, max_density=float(np.float32(1e-30)), min_seq_len=0),
    dict(scale=float(np.finfo(np.float32).tiny)),
    dict(estimate=1, estimate_stride=1, threshold=0.5, min_seq_len=0),
    dict(estimate=1, estimate_stride=ESTIMATE_STRIDE_MAX, threshold=0.5, min_seq_len=0),
    dict(estimate=2, threshold=0.5, min_seq_len=0),
    dict(window_ahead=TOKENS_MAX, sliding_window=TOKENS_MAX),
    dict(window_ahead=0, threshold=0.5, min_seq_len=0),
]


@pytest.mark.parametrize("attrs", AT_THE_BOUNDS, ids=str)
def test_attributes_at_their_bounds_match_reference(attrs):
    rng = np.random.default_rng(11)
    q, k, v = random_qkv(rng, 1, 2, 1, 37, 45, 8, 8)
    attrs = dict(dict(block_size=8, global_tokens=0, local_window=0), **attrs)
    y, density = run_op(q, k, v, **attrs)
    y_ref, density_ref = sparse_attention(q, k, v, **attrs)
    np.testing.assert_allclose(density, density_ref, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)


@pytest.mark.parametrize("block_size", [45, 46, 1000, 2**20])
def test_block_size_past_the_sequence_is_one_block(block_size):
    # Larger than both lengths: one query block and one key block, however large (the kernel
    # cuts it to the sequence, so memory does not grow with it).
    rng = np.random.default_rng(12)
    q, k, v = random_qkv(rng, 1, 2, 1, 32, 45, 8, 8)
    attrs = dict(global_tokens=0, local_window=0, min_seq_len=0, threshold=0.5)
    y, density = run_op(q, k, v, block_size=block_size, **attrs)
    y_ref, density_ref = sparse_attention(q, k, v, block_size=45, **attrs)
    np.testing.assert_array_equal(density, density_ref)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(y, dense_attention(q, k, v), atol=1e-5)


@pytest.mark.parametrize("window", [44, 45, 1000, TOKENS_MAX])
def test_local_window_past_the_sequence_reaches_every_key(window):
    rng = np.random.default_rng(13)
    q, k, v = random_qkv(rng, 1, 1, 1, 16, 45, 8, 8)
    attrs = dict(block_size=4, global_tokens=0, min_seq_len=0, threshold=0.0, max_density=0.01)
    y, density = run_op(q, k, v, local_window=window, **attrs)
    np.testing.assert_array_equal(density, 1.0)  # every block is in the window
    np.testing.assert_allclose(y, dense_attention(q, k, v), atol=1e-5)


def test_reference_cut_to_the_sequence_changes_no_selection():
    # The reference's own clamp (effective) against its uncut rule, at sizes where the uncut
    # rule is cheap.
    from tfsa_onnx.reference import _block_any, _forced_blocks, effective

    rng = np.random.default_rng(14)
    q, k, _ = random_qkv(rng, 1, 2, 1, 20, 30, 8, 8)
    may_attend = rng.random((1, 2, 20, 30)) < 0.7
    for raw in (
        SparseAttentionAttributes(block_size=97, threshold=0.5, min_seq_len=0),
        SparseAttentionAttributes(block_size=4, global_tokens=500, local_window=0, min_seq_len=0),
        SparseAttentionAttributes(block_size=4, global_tokens=0, local_window=400, min_seq_len=0),
    ):
        cut = effective(raw, 20, 30)
        assert cut != raw
        np.testing.assert_array_equal(_forced_blocks(20, 30, raw), _forced_blocks(20, 30, cut))
        allowed_raw, allowed_cut = (
            _block_any(may_attend, raw.block_size),
            _block_any(may_attend, cut.block_size),
        )
        np.testing.assert_array_equal(allowed_raw, allowed_cut)
        np.testing.assert_array_equal(
            select_blocks(q, k, allowed_raw, raw), select_blocks(q, k, allowed_cut, cut)
        )


def test_library_registers_with_the_installed_onnxruntime():
    assert Path(tfsa_onnx.get_library_path()).is_file()
    so = tfsa_onnx.session_options()
    assert isinstance(so, ort.SessionOptions)


def test_unknown_dims_are_not_taken_for_minus_one():
    # Inputs whose dims have neither a value nor a name: a Shape of Y must still see the real sizes.
    from onnx import helper

    model = sparse_attention_model(density_output=False)
    for value in list(model.graph.input) + list(model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            dim.Clear()
    model.graph.node.append(helper.make_node("Shape", ["Y"], ["y_shape"]))
    model.graph.output.append(helper.make_tensor_value_info("y_shape", TensorProto.INT64, [4]))
    session = ort.InferenceSession(model.SerializeToString(), tfsa_onnx.session_options())
    q = np.zeros((2, 2, 5, 4), np.float32)
    _, shape = session.run(None, {"query": q, "key": q, "value": q[..., :3]})
    np.testing.assert_array_equal(shape, [2, 2, 5, 3])


def _random_case(seed: int):
    """A random, often awkward, configuration: shapes, GQA, block size, mask, attributes."""
    rng = np.random.default_rng(1000 + seed)
    hkv = int(rng.integers(1, 4))
    hq = hkv * int(rng.integers(1, 4))
    sk = int(rng.integers(1, 400))
    sq = int(rng.integers(1, sk + 1)) if rng.random() < 0.3 else sk
    d, dv = int(rng.integers(1, 80)), int(rng.integers(1, 80))
    q, k, v = random_qkv(rng, int(rng.integers(1, 3)), hq, hkv, sq, sk, d, dv)
    bs = int(rng.choice([1, 7, 16, 32, 50, 64, 128]))
    attrs = dict(
        block_size=bs,
        is_causal=int(rng.integers(0, 2)),
        global_tokens=int(rng.choice([0, 0, 5, 64])),
        local_window=int(rng.choice([0, 0, 10, 100])),
        threshold=float(rng.choice([0.25, 0.5, 0.875, 1.0])),
        max_density=float(rng.choice([0.125, 0.5, 0.75, 1.0])),
        min_seq_len=int(rng.choice([0, 0, 0, 200])),
        scale=float(rng.choice([0.0, 0.0, 0.3])),
        estimate=seed % 3,
        estimate_stride=int(rng.choice([1, 3, 8, 16])),
    )
    mask = None
    kind = rng.integers(0, 3)
    if kind == 1:
        mask = rng.random((q.shape[0], 1, 1, sk)) < 0.8
    elif kind == 2:
        mask = np.where(rng.random((hq, sq, sk)) < 0.7, rng.standard_normal((hq, sq, sk)), -np.inf)
        mask = mask.astype(np.float32)
    return q, k, v, mask, attrs


@pytest.mark.parametrize("seed", range(40))
def test_random_configurations_match_reference(seed):
    q, k, v, mask, attrs = _random_case(seed)
    y, density = run_op(q, k, v, mask, **attrs)
    y_ref, density_ref = sparse_attention(q, k, v, mask, **attrs)
    np.testing.assert_allclose(density, density_ref, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("isa", ["generic", "wide"])
def test_other_kernel_builds_match_reference_too(isa):
    # TFSA_ISA (read at load) picks another build of the same math: `generic` is the portable
    # one (CPUs without AVX2, ARM); `wide` is the AVX-512 layout (16-float vectors, 8-row
    # tiles) compiled for any CPU, so that its logic is tested where AVX-512 is missing.
    import os
    import subprocess
    import sys

    env = dict(os.environ, TFSA_ISA=isa)
    tests = "random_configurations or dense_settings or per_query_masks or nan"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


@pytest.mark.parametrize("sq,sk", [(0, 5), (5, 0), (0, 0)])
def test_empty_sequences_give_empty_or_zero_outputs(sq, sk):
    q = np.zeros((1, 2, sq, 8), np.float32)
    k = np.ones((1, 2, sk, 8), np.float32)
    y, density = run_op(q, k, k, threshold=0.5, **SPARSE_OFF)
    assert y.shape == (1, 2, sq, 8)
    np.testing.assert_array_equal(y, 0)
    np.testing.assert_array_equal(density, 1)


def test_concurrent_runs_of_one_session_agree_with_serial_ones():
    # A server calls run() from several threads on one session: each call takes its own
    # workspace, so results must not mix.
    from concurrent.futures import ThreadPoolExecutor

    attrs = dict(block_size=32, is_causal=1, threshold=0.75, max_density=0.5, **SPARSE_OFF)
    inputs = [
        random_qkv(np.random.default_rng(50 + i), 1, 4, 2, 300 + 40 * i, 300 + 40 * i, 32, 32)
        for i in range(6)
    ]
    serial = [run_op(*qkv, **attrs)[0] for qkv in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda qkv: run_op(*qkv, **attrs)[0], inputs * 3))
    for i, y in enumerate(concurrent):
        np.testing.assert_array_equal(y, serial[i % len(inputs)])


def test_cuda_library_loads_everywhere_and_runs_the_cpu_kernels():
    # libtfsa_ops_cuda registers the op for both providers; under a CPU-only onnxruntime it
    # must load (its CUDA runtime is linked statically) and give the CPU kernel's results.
    import os
    import shutil
    import subprocess
    import sys

    try:
        path = tfsa_onnx.get_library_path("cuda")
    except FileNotFoundError:
        assert shutil.which("nvcc") is None, "nvcc is on PATH but the CUDA library was not built"
        pytest.skip("no CUDA toolkit here, so no CUDA library was built")
    assert Path(path).name.startswith("libtfsa_ops_cuda")
    env = dict(os.environ, TFSA_ONNX_LIBRARY="cuda")
    tests = "random_configurations or per_query_masks or bfloat16 or float16"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


# --- queries that fit in one block, with a mask that differs per row ----------------------


@pytest.mark.parametrize("mask_shape", [(1, 1, 16, 16), (16, 16), (1, 2, 16, 16)])
@pytest.mark.parametrize("dtype", [np.float32, np.bool_])
def test_per_row_mask_rows_are_read_when_queries_fit_in_one_block(mask_shape, dtype):
    # S = 16 under the default block of 64: one query block. Row 5 may attend to nothing and
    # must give zeros; row 9 sees only keys 0..3.
    rng = np.random.default_rng(15)
    q, k, v = random_qkv(rng, 1, 2, 2, 16, 16, 8, 8)
    allowed = np.ones(mask_shape, bool)
    allowed[..., 5, :] = False
    allowed[..., 9, 4:] = False
    mask = allowed if dtype == np.bool_ else np.where(allowed, 0.0, -np.inf).astype(np.float32)
    for attrs in (dict(SPARSE_OFF), dict(min_seq_len=0, threshold=0.5, global_tokens=0, local_window=0)):
        y, density = run_op(q, k, v, mask, **attrs)
        y_ref, density_ref = sparse_attention(q, k, v, mask, **attrs)
        np.testing.assert_array_equal(y[..., 5, :], 0.0)
        np.testing.assert_allclose(y, y_ref, atol=1e-5)
        np.testing.assert_allclose(density, density_ref)
    rows = np.r_[0:5, 6:16]  # plain dense attention gives NaN for the empty row 5
    y_dense = run_op(q, k, v, mask, **SPARSE_OFF)[0]
    np.testing.assert_allclose(y_dense[..., rows, :], dense_attention(q, k, v, mask)[..., rows, :], atol=1e-5)


# --- NaN and infinity (the rule is in reference.py's docstring) ----------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("block_size", [64, 4])
def test_nan_or_inf_in_a_mask_makes_that_row_nan_and_no_other(value, block_size):
    rng = np.random.default_rng(16)
    q, k, v = random_qkv(rng, 1, 1, 1, 16, 16, 8, 8)
    mask = np.zeros((1, 1, 16, 16), np.float32)
    mask[0, 0, 5, 3] = value
    y, _ = run_op(q, k, v, mask, block_size=block_size, **SPARSE_OFF)
    assert np.isnan(y[0, 0, 5]).all()
    assert np.isfinite(np.delete(y[0, 0], 5, axis=0)).all()
    np.testing.assert_allclose(
        y, sparse_attention(q, k, v, mask, block_size=block_size, **SPARSE_OFF)[0], atol=1e-5
    )


def test_nan_in_keys_and_values_a_row_does_not_attend_stays_out_of_it():
    # Key 20 and value 21 are NaN; rows before them (causal) and rows whose mask hides them
    # must stay finite, rows that attend them become NaN.
    rng = np.random.default_rng(17)
    q, k, v = random_qkv(rng, 1, 1, 1, 32, 32, 8, 8)
    k[0, 0, 20, 1] = np.nan
    v[0, 0, 21, 2] = np.nan
    mask = np.ones((32, 32), bool)
    mask[28:, 20:22] = False  # rows 28.. do not see keys 20 and 21
    attrs = dict(block_size=16, is_causal=1, **SPARSE_OFF)
    y, _ = run_op(q, k, v, mask, **attrs)
    y_ref, _ = sparse_attention(q, k, v, mask, **attrs)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)  # NaN exactly where the reference has it
    rows_nan = np.isnan(y[0, 0]).any(axis=-1)
    np.testing.assert_array_equal(np.flatnonzero(rows_nan), np.arange(20, 28))


def test_nan_in_a_key_does_not_change_the_block_selection():
    rng = np.random.default_rng(18)
    q, k, v = random_qkv(rng, 1, 2, 1, 256, 256, 16, 16)
    attrs = dict(block_size=32, threshold=0.6, max_density=0.5, **SPARSE_OFF)
    _, density_clean = run_op(q, k, v, **attrs)
    k_nan = k.copy()
    k_nan[0, 0, 40, 3] = np.nan  # block 1
    zeroed = k.copy()
    zeroed[0, 0, 40, 3] = 0.0  # the rule: a non-finite element counts as 0 in the block means
    y, density = run_op(q, k_nan, v, **attrs)
    np.testing.assert_array_equal(density, run_op(q, zeroed, v, **attrs)[1])
    y_ref, density_ref = sparse_attention(q, k_nan, v, **attrs)
    np.testing.assert_allclose(density, density_ref)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    assert np.abs(density - density_clean).max() < 0.1
    # rows whose chosen blocks miss block 1 stay finite
    assert 0 < np.isnan(y).any(axis=-1).sum() < y.shape[1] * y.shape[2]


@pytest.mark.parametrize(
    "attrs,words",
    [
        (dict(block_size=8.0), "block_size must be an integer attribute"),
        (dict(is_causal="yes"), "is_causal must be an integer attribute"),
        (dict(threshold=1), "threshold must be a float attribute"),
        (dict(scale="0.5"), "scale must be a float attribute"),
    ],
)
def test_attribute_of_the_wrong_type_is_an_error_not_the_default(attrs, words):
    q = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(Exception, match=words):
        run_op(q, q, q, **attrs)


# --- The few-rows path (exact_rows.cc: up to 4 dense rows without a mask) ------------------


@pytest.mark.parametrize("sq", [1, 2, 4, 5])
@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_few_rows_equal_the_reference(sq, causal, dtype):
    # 5 rows take the tile walk: the two paths must agree with the reference alike.
    rng = np.random.default_rng(sq + 10 * causal)
    q, k, v = random_qkv(rng, 2, 6, 2, sq, 77, 40, 24, dtype)
    y, density = run_op(q, k, v, is_causal=causal, block_size=16)
    y_ref, density_ref = sparse_attention(q, k, v, is_causal=causal, block_size=16)
    np.testing.assert_allclose(
        y.astype(np.float32), y_ref.astype(np.float32), atol=2e-3 if dtype == np.float16 else 2e-5
    )
    np.testing.assert_array_equal(density, density_ref)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_few_rows_keep_nan_and_inf_to_the_rows_that_attend_them(value):
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(rng, 1, 2, 1, 3, 30, 8, 8)
    k[0, 0, 28, 0] = value  # seen by the last two rows (causal, bottom right) only
    v[0, 0, 29, 1] = value  # the last row only
    q[0, 1, 0, 2] = np.nan  # head 1, row 0
    (y,) = run_op(q, k, v, density=False, is_causal=1)
    y_ref, _ = sparse_attention(q, k, v, is_causal=1)
    np.testing.assert_allclose(y, y_ref, atol=2e-5)  # NaN where the reference has NaN
    assert np.isfinite(y[0, 0, 0]).all() and np.isnan(y[0, 1, 0]).all()


# (b, hq, hkv, sq, sk, block, causal, sliding_window, extra attributes)
WINDOW_CASES = [
    (1, 2, 1, 200, 200, 32, 1, 50, {}),  # a window across block edges
    (2, 4, 2, 130, 130, 64, 1, 64, dict(threshold=0.5, max_density=0.5)),  # sparse inside the band
    (1, 2, 2, 40, 170, 16, 1, 33, {}),  # queries at the last 40 of 170 positions (a KV cache)
    (1, 1, 1, 100, 100, 8, 0, 20, {}),  # without causality: only the past is cut
    (1, 2, 1, 77, 77, 16, 1, 1, {}),  # each query sees itself alone
    (1, 2, 1, 90, 90, 32, 1, 500, {}),  # a window past the sequence changes nothing
]


@pytest.mark.parametrize("case", WINDOW_CASES, ids=str)
def test_sliding_window_matches_reference(case):
    """sliding_window hides keys before p - W + 1 as a band mask does: equal to the reference,
    and to the same call with the band as a mask, at awkward lengths and with a padding mask."""
    b, hq, hkv, sq, sk, bs, causal, window, extra = case
    rng = np.random.default_rng(sq + window)
    q, k, v = random_qkv(rng, b, hq, hkv, sq, sk, 24, 24)
    padding = rng.random((b, 1, 1, sk)) < 0.9
    attrs = dict(SPARSE_OFF, threshold=1.0, block_size=bs, is_causal=causal) | extra
    y, density = run_op(q, k, v, padding, **attrs, sliding_window=window)
    y_ref, density_ref = sparse_attention(q, k, v, padding, **attrs, sliding_window=window)
    np.testing.assert_allclose(density, density_ref, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-4)
    positions = np.arange(sq)[:, None] + (sk - sq)
    band = padding & (np.arange(sk)[None, :] > positions - window)
    if not extra:  # dense: the same as the band given as a mask
        y_band, _ = sparse_attention(q, k, v, band, **attrs)
        np.testing.assert_allclose(y_ref, y_band, atol=1e-6)


# (b, hq, hkv, sq, sk, block, causal, sliding_window, window_ahead, extra attributes)
BAND_CASES = [
    (1, 2, 1, 100, 100, 16, 0, 9, 8, {}),  # |i - j| <= 8 (ModernBERT, window 16) across block edges
    (1, 2, 1, 77, 77, 16, 0, 8, 7, {}),  # |i - j| <= 7 (an odd local window, 15)
    (1, 2, 1, 77, 77, 16, 0, 0, 0, {}),  # ahead 0 alone: causal attention
    (1, 1, 1, 50, 50, 8, 0, 0, 50, {}),  # ahead past the sequence changes nothing
    (1, 1, 1, 70, 70, 16, 0, 0, 5, {}),  # ahead alone: the future cut, the whole past seen
    (1, 2, 1, 90, 90, 32, 1, 20, 5, {}),  # causal: ahead is redundant
    (1, 2, 2, 40, 170, 16, 0, 33, 7, {}),  # queries at the last 40 of 170 positions
    (1, 1, 1, 50, 20, 8, 0, 10, 3, {}),  # more queries than keys: the first rows see nothing
    (2, 4, 2, 130, 130, 32, 0, 33, 33, dict(threshold=0.5, max_density=0.5)),  # sparse in the band
    # the global block outside the band is not allowed (the density's denominator says so)
    (1, 2, 1, 200, 200, 16, 0, 9, 8, dict(threshold=0.5, global_tokens=16)),
    (1, 2, 1, 128, 128, 16, 0, 40, 40, dict(threshold=0.7, estimate=1, estimate_stride=4)),
    (1, 2, 1, 128, 128, 16, 0, 40, 21, dict(threshold=0.7, estimate=2)),
    (1, 2, 1, 40, 150, 16, 0, 30, 2, dict(threshold=0.5, global_tokens=16, query_positions=1)),
]


@pytest.mark.parametrize("case", BAND_CASES, ids=str)
def test_window_ahead_matches_reference(case):
    """window_ahead A hides keys after p + A, with sliding_window the two-sided band p - W < j <=
    p + A: equal to the reference, density included (blocks outside the band are not allowed),
    and dense to the same call with the band as a mask, at awkward lengths with padding."""
    b, hq, hkv, sq, sk, bs, causal, window, ahead, extra = case
    rng = np.random.default_rng(sq + window + 3 * ahead)
    q, k, v = random_qkv(rng, b, hq, hkv, sq, sk, 24, 24)
    padding = rng.random((b, 1, 1, sk)) < 0.9
    attrs = dict(SPARSE_OFF, threshold=1.0, block_size=bs, is_causal=causal) | extra
    band_attrs = dict(sliding_window=window, window_ahead=ahead)
    y, density = run_op(q, k, v, padding, **attrs, **band_attrs)
    y_ref, density_ref = sparse_attention(q, k, v, padding, **attrs, **band_attrs)
    np.testing.assert_allclose(density, density_ref, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-4)
    positions = np.arange(sq)[:, None] + (sk - sq)
    keys = np.arange(sk)[None, :]
    band = padding & (keys <= positions + ahead) & ((keys > positions - window) if window else True)
    if not extra:  # dense: the same as the band given as a mask
        y_band, _ = sparse_attention(q, k, v, band, **attrs)
        np.testing.assert_allclose(y_ref, y_band, atol=1e-6)
        y_op_band, _ = run_op(q, k, v, band, **attrs)
        np.testing.assert_allclose(y, y_op_band, atol=2e-5, rtol=1e-4)


def test_window_ahead_keeps_its_default_meaning():
    """-1 (the default, what version-1 models have) limits nothing; 0 is causal attention."""
    rng = np.random.default_rng(21)
    q, k, v = random_qkv(rng, 1, 2, 1, 45, 45, 16, 16)
    attrs = dict(SPARSE_OFF, block_size=16)
    np.testing.assert_array_equal(run_op(q, k, v, **attrs, window_ahead=-1)[0], run_op(q, k, v, **attrs)[0])
    np.testing.assert_allclose(
        run_op(q, k, v, **attrs, window_ahead=0)[0], run_op(q, k, v, **attrs, is_causal=1)[0], atol=1e-6
    )


@pytest.mark.parametrize("sq,sk", [(1, 300), (5, 300), (40, 130), (70, 70)])
@pytest.mark.parametrize("positions", [0, 1])
def test_query_positions_count_the_kv_cache_offset_for_global_queries(sq, sk, positions):
    """query_positions 1: the queries are the last Sq key positions, so only a query at a
    position below global_tokens takes every block; 0 (version 1's rule): the call's first rows.
    Equal to the reference either way; a decode row past the global tokens is sparse with 1."""
    rng = np.random.default_rng(sq * 7 + sk + positions)
    q, k, v = random_qkv(rng, 1, 4, 2, sq, sk, 16, 16)
    attrs = dict(block_size=16, global_tokens=16, local_window=16, threshold=0.5, min_seq_len=0)
    attrs |= dict(is_causal=1, query_positions=positions)
    y, density = run_op(q, k, v, **attrs)
    y_ref, density_ref = sparse_attention(q, k, v, **attrs)
    np.testing.assert_allclose(density, density_ref, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-4)
    if sq == 1:  # the decode row is global by its index, not by its position
        assert (density == 1.0).all() if positions == 0 else (density < 1.0).all()
    if sq == sk:  # no cache: the two rules agree
        other = sparse_attention(q, k, v, **{**attrs, "query_positions": 1 - positions})[0]
        np.testing.assert_array_equal(y_ref, other)
