"""Per-head budgets (head_thresholds) and streaming heads in the CPU kernel, against the numpy
reference; the bad lists the op must refuse with a clear error."""

from __future__ import annotations

import numpy as np
import pytest
from test_kernel import SPARSE_OFF, random_qkv, run_op

from tfsa_onnx.reference import (
    HEAD_THRESHOLDS_MAX,
    SparseAttentionAttributes,
    _attendable,
    _block_any,
    _forced_blocks,
    sparse_attention,
)

# (batch, q_heads, kv_heads, q_len, kv_len, head_dim, v_head_dim, block_size, causal), the heads'
# thresholds (a 0: a streaming head), other attributes
HEAD_CASES = [
    ((1, 4, 2, 512, 512, 32, 32, 64, 1), (0.9, 0.0, 0.5, 1.0), dict(global_tokens=64, local_window=64)),
    ((2, 3, 1, 333, 333, 24, 16, 50, 0), (0.0, 0.75, 0.3), dict(global_tokens=10, local_window=30)),
    ((1, 2, 2, 96, 480, 32, 32, 32, 1), (0.6, 0.0), dict(local_window=40)),
    (
        (1, 6, 3, 257, 257, 16, 8, 32, 1),
        (0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        dict(global_tokens=32, local_window=32),
    ),
    ((1, 4, 4, 300, 300, 48, 40, 32, 0), (1.0, 0.95, 0.2, 0.0), dict(max_density=0.5)),
]
ESTIMATES = [dict(estimate=0), dict(estimate=1), dict(estimate=1, estimate_stride=5), dict(estimate=2)]


def structured_qkv(shape, seed):
    """Random q, k, v of a case shape (b, hq, hkv, sq, sk, d, dv, block, causal) whose keys have a
    per-block component, so the estimate has real preferences."""
    b, hq, hkv, sq, sk, d, dv, bs, causal = shape
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(rng, b, hq, hkv, sq, sk, d, dv)
    k += 3 * rng.standard_normal((b, hkv, sk // bs + 1, d)).repeat(bs, axis=2)[:, :, :sk].astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("estimate", ESTIMATES, ids=str)
@pytest.mark.parametrize("shape,heads,attrs", HEAD_CASES, ids=lambda x: str(x))
def test_head_thresholds_match_reference(shape, heads, attrs, estimate):
    q, k, v = structured_qkv(shape, sum(shape))
    full = dict(SPARSE_OFF, block_size=shape[7], is_causal=shape[8], head_thresholds=heads) | attrs | estimate
    y, density = run_op(q, k, v, **full)
    y_ref, density_ref = sparse_attention(q, k, v, None, **full)
    np.testing.assert_allclose(density, density_ref, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("estimate", ESTIMATES[:2], ids=str)
def test_each_head_computes_as_the_node_would_at_its_threshold(estimate):
    # The rule itself: head h with head_thresholds[h] = t gives what the whole node gives for
    # head h with threshold t (a head's selection reads its own threshold only).
    shape, heads = (1, 4, 2, 384, 384, 32, 32, 32, 1), (0.3, 0.0, 0.8, 0.95)
    q, k, v = structured_qkv(shape, 5)
    base = dict(SPARSE_OFF, block_size=32, is_causal=1, global_tokens=32, local_window=32) | estimate
    y, density = run_op(q, k, v, **base, head_thresholds=heads)
    for h, t in enumerate(heads):
        y_node, density_node = run_op(q, k, v, **base, threshold=t)
        np.testing.assert_array_equal(y[:, h], y_node[:, h])
        np.testing.assert_array_equal(density[:, h], density_node[:, h])
    assert len(set(density[0].tolist())) == 4, "the heads should choose differently here"


def test_a_streaming_head_computes_its_forced_blocks_only():
    shape = (1, 2, 1, 640, 640, 16, 16, 64, 1)
    q, k, v = structured_qkv(shape, 7)
    attrs = dict(min_seq_len=0, block_size=64, is_causal=1, global_tokens=64, local_window=100)
    y, density = run_op(q, k, v, **attrs, head_thresholds=(0.0, 0.9))
    a = SparseAttentionAttributes(**attrs)
    _, may_attend = _attendable(None, (1, 1, 640, 640), True)
    allowed = _block_any(may_attend, 64)[0, 0]
    forced = _forced_blocks(640, 640, a) & allowed
    assert density[0, 0] == pytest.approx(forced.sum() / allowed.sum())
    assert density[0, 1] > density[0, 0]
    y_ref, _ = sparse_attention(q, k, v, None, **attrs, head_thresholds=(0.0, 0.9))
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-4)


def test_head_thresholds_below_min_seq_len_are_dense():
    q, k, v = structured_qkv((1, 2, 1, 200, 200, 16, 16, 32, 1), 3)
    y, density = run_op(q, k, v, block_size=32, is_causal=1, min_seq_len=1024, head_thresholds=(0.0, 0.5))
    np.testing.assert_array_equal(density, np.ones((1, 2), np.float32))
    y_ref, _ = sparse_attention(q, k, v, None, block_size=32, is_causal=1, threshold=1.0)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "heads,words",
    [
        ((0.5, 0.5, 0.5), "head_thresholds gives 3 thresholds for 2 query heads"),
        ((0.5,), "head_thresholds gives 1 thresholds for 2 query heads"),
        ((0.5, 1.5), "head_thresholds values must be floats in [0, 1]"),
        ((-0.1, 0.5), "got -0.1 at index 0"),
        ((0.5, float("nan")), "got nan at index 1"),
        ((0.5,) * (HEAD_THRESHOLDS_MAX + 1), f"at most {HEAD_THRESHOLDS_MAX} values"),
        ((1, 0), "head_thresholds must be a list of floats"),
    ],
)
def test_bad_head_thresholds_are_errors(heads, words):
    q = np.zeros((1, 2, 8, 4), np.float32)
    with pytest.raises(Exception) as info:
        run_op(q, q, q, head_thresholds=heads)
    assert words in str(info.value), str(info.value)


def test_reference_refuses_a_wrong_count_too():
    q = np.zeros((1, 2, 8, 4), np.float32)
    with pytest.raises(ValueError, match="head_thresholds gives 3 thresholds for 2 query heads"):
        sparse_attention(q, q, q, head_thresholds=(0.1, 0.2, 0.3))


def test_most_heads_the_list_holds():
    rng = np.random.default_rng(2)
    heads = HEAD_THRESHOLDS_MAX
    q, k, v = random_qkv(rng, 1, heads, 1, 64, 64, 4, 4)
    thresholds = tuple(float(x) for x in np.linspace(0, 1, heads))
    attrs = dict(SPARSE_OFF, block_size=16, head_thresholds=thresholds)
    y, density = run_op(q, k, v, **attrs)
    y_ref, density_ref = sparse_attention(q, k, v, None, **attrs)
    np.testing.assert_allclose(density, density_ref, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-4)


def test_group_query_attention_refuses_a_wrong_count():
    from test_gqa_op import SPARSE, Case, make_feeds, run

    import tfsa_onnx

    case = Case(seq=40, attrs=SPARSE | {"head_thresholds": (0.5, 0.5)})  # 4 query heads
    with pytest.raises(Exception, match="head_thresholds gives 2 thresholds for 4 query heads"):
        run(case, make_feeds(case, np.random.default_rng(0)), tfsa_onnx.DOMAIN)


def test_decode_steps_with_head_thresholds_are_exact():
    from test_gqa_op import SPARSE, Case, check_against_ort

    check_against_ort(Case(seq=1, past=(200,), cache=220, attrs=SPARSE | {"head_thresholds": (0.0,) * 4}))
