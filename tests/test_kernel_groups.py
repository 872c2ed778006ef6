"""group_selection (one selection per KV group: the union of the group's picks, or one shared
estimate) in the CPU kernel, against the numpy reference; the rule itself checked from the
per-head selection."""

from __future__ import annotations

import numpy as np
import pytest
import test_kernel_bias
from test_kernel import SPARSE_OFF, run_op
from test_kernel_heads import structured_qkv

from tfsa_onnx.reference import GROUP_SELECTIONS, _attendable, _block_any, select_blocks, sparse_attention

UNION, SHARED = GROUP_SELECTIONS.index("union"), GROUP_SELECTIONS.index("shared")

# (batch, q_heads, kv_heads, q_len, kv_len, head_dim, v_head_dim, block_size, causal), attributes
GROUP_CASES = [
    ((1, 6, 2, 384, 384, 32, 32, 32, 1), dict(threshold=0.8, global_tokens=32, local_window=32)),
    ((2, 4, 1, 333, 333, 24, 16, 50, 0), dict(threshold=0.6, max_density=0.4)),
    ((1, 9, 3, 100, 420, 16, 16, 32, 1), dict(threshold=0.7, local_window=40)),  # Sq < Sk, ragged
    ((1, 4, 2, 300, 300, 48, 40, 32, 0), dict(head_thresholds=(0.9, 0.0, 0.0, 0.0), max_density=0.5)),
    ((1, 4, 2, 256, 256, 16, 16, 32, 1), dict(head_thresholds=(1.0, 0.3, 0.0, 0.5), max_density=0.6)),
]
ESTIMATES = [dict(estimate=0), dict(estimate=1), dict(estimate=1, estimate_stride=5), dict(estimate=2)]


def _attrs(shape, attrs, estimate, mode):
    return dict(SPARSE_OFF, block_size=shape[7], is_causal=shape[8], group_selection=mode) | attrs | estimate


@pytest.mark.parametrize("mode", [UNION, SHARED], ids=["union", "shared"])
@pytest.mark.parametrize("estimate", ESTIMATES, ids=str)
@pytest.mark.parametrize("shape,attrs", GROUP_CASES, ids=lambda x: str(x))
def test_group_selection_matches_reference(shape, attrs, estimate, mode):
    q, k, v = structured_qkv(shape, sum(shape))
    full = _attrs(shape, attrs, estimate, mode)
    y, density = run_op(q, k, v, **full)
    y_ref, density_ref = sparse_attention(q, k, v, None, **full)
    np.testing.assert_allclose(density, density_ref, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-4)


def _selected(q, k, mode, **attrs):
    from tfsa_onnx.reference import SparseAttentionAttributes, effective

    sq, sk = q.shape[2], k.shape[2]
    a = effective(SparseAttentionAttributes(**attrs, group_selection=mode), sq, sk)
    _, may_attend = _attendable(None, (q.shape[0], q.shape[1], sq, sk), bool(a.is_causal))
    return select_blocks(q, k, _block_any(may_attend, a.block_size), a)


@pytest.mark.parametrize("estimate", ESTIMATES[:2], ids=str)
def test_union_is_the_groups_per_head_picks_and_shared_is_one_pick_per_group(estimate):
    shape = (1, 6, 2, 384, 384, 32, 32, 32, 1)
    q, k, _ = structured_qkv(shape, 3)
    attrs = dict(SPARSE_OFF, block_size=32, is_causal=1, threshold=0.7) | estimate
    per_head = _selected(q, k, 0, **attrs).reshape(1, 2, 3, 12, 12)
    union = _selected(q, k, UNION, **attrs).reshape(1, 2, 3, 12, 12)
    shared = _selected(q, k, SHARED, **attrs).reshape(1, 2, 3, 12, 12)
    assert (union == per_head.any(axis=2, keepdims=True)).all()
    assert (shared == shared[:, :, :1]).all()  # every head of a group computes the same blocks
    assert union.sum() > per_head.sum(), "the heads should choose differently here"
    # the kernel's density says the same
    _, density = run_op(q, k, k, **attrs, group_selection=UNION)
    np.testing.assert_allclose(density[0], union.sum(axis=(3, 4)).ravel() / 78)  # 78 causal blocks


def test_shared_estimate_of_one_head_per_group_is_per_head_selection():
    shape = (1, 3, 3, 256, 256, 16, 16, 32, 1)
    q, k, v = structured_qkv(shape, 4)
    for estimate in ESTIMATES:
        attrs = dict(SPARSE_OFF, block_size=32, is_causal=1, threshold=0.6) | estimate
        y0, d0 = run_op(q, k, v, **attrs)
        for mode in (UNION, SHARED):
            y, d = run_op(q, k, v, **attrs, group_selection=mode)
            np.testing.assert_array_equal(y, y0)
            np.testing.assert_array_equal(d, d0)


@pytest.mark.parametrize("mode", [UNION, SHARED], ids=["union", "shared"])
@pytest.mark.parametrize("estimate", ESTIMATES[:2] + ESTIMATES[3:], ids=str)
def test_group_selection_with_a_per_head_mask_and_a_bias(mode, estimate):
    # heads of a group may attend different blocks: each computes the group's within its own
    shape = (2, 4, 2, 200, 260, 16, 16, 32, 1)
    q, k, v = structured_qkv(shape, 6)
    rng = np.random.default_rng(6)
    mask = rng.random((2, 4, 200, 260)) > 0.02
    mask[:, 1, :, 64:160] = False  # one head of the first group never sees these keys
    bias = rng.standard_normal((1, 4, 200, 260)).astype(np.float32)
    attrs = dict(SPARSE_OFF, block_size=32, is_causal=1, threshold=0.7, group_selection=mode) | estimate
    y, density = test_kernel_bias.run_op(q, k, v, mask, bias, **attrs)
    y_ref, density_ref = sparse_attention(q, k, v, mask, bias, **attrs)
    np.testing.assert_allclose(density, density_ref, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", [UNION, SHARED], ids=["union", "shared"])
def test_group_selection_with_nan_and_threads(mode):
    shape = (1, 4, 2, 320, 320, 16, 16, 32, 1)
    q, k, v = structured_qkv(shape, 8)
    q[0, 1, 5, 3] = np.nan  # row 5 of head 1 is NaN; the selection counts it as 0
    k[0, 0, 200, 0] = np.inf
    attrs = dict(SPARSE_OFF, block_size=32, is_causal=1, threshold=0.8, estimate=1, group_selection=mode)
    y1, d1 = run_op(q, k, v, threads=1, **attrs)
    y2, d2 = run_op(q, k, v, threads=2, **attrs)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(d1, d2)
    y_ref, d_ref = sparse_attention(q, k, v, None, **attrs)
    np.testing.assert_allclose(d1, d_ref, atol=1e-6)
    np.testing.assert_array_equal(np.isnan(y1), np.isnan(y_ref))
    finite = ~np.isnan(y_ref)
    np.testing.assert_allclose(y1[finite], y_ref[finite], atol=2e-5, rtol=1e-4)


def test_group_selection_out_of_range_is_an_error():
    q = np.zeros((1, 2, 8, 4), np.float32)
    with pytest.raises(Exception, match=r"group_selection must be an integer in \[0, 2\].*got 3"):
        run_op(q, q[:, :1], q[:, :1], group_selection=3)
