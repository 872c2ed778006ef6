"""Attention computed with batch and heads merged into one axis (BLOOM's baddbmm): 3-D
MatMuls on [B*H, S, D] between Reshapes from and back to [B, H, S, D].

The rewrite is exact only when every Reshape merges or splits the leading [B, H] pair and
nothing else, so each one is proven from the shapes (`MaskAlgebra.shape_of`, affine in the
graph's symbolic dims): Q, K and V are [B, H, S, D] before their merge and [B*H, S, D] after,
the scores are split back into the same B and H with the query length kept, and the output
is split into [B, H, Sq, Dv] (see `prove` for why the probabilities' merge follows). A term
added to the scores while they are merged ([B*H | 1, r, c], ALiBi's [B*H, 1, Sk]) becomes
[B, H, r, c] (or [1, 1, r, c]) for the op's attn_bias. Where a shape cannot be proven (the
TorchScript export leaves them unknown) the block stays as it was, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir

from tfsa_onnx.rewrite.common import Builder, GiveUp, attr, producer, single_consumer
from tfsa_onnx.rewrite.mask_proof import Dim, MaskAlgebra, Unknown


@dataclass
class MergedHeads:
    """The 4-D tensors behind a merged-heads attention, proven."""

    query: ir.Value  # [B, H, Sq, D]
    key: ir.Value  # [B, H, Sk, D]
    value: ir.Value  # [B, H, Sk, Dv]
    output: ir.Value  # what the op's Y replaces: pv's [B*H, Sq, Dv] output (merge_output), or its split
    batch_heads: tuple[Dim, Dim]  # (B, H)
    q_len: Dim
    kv_len: Dim
    split_output: bool = False  # output is the graph's split of pv's output, else pv's own


def _shape(algebra: MaskAlgebra, value: ir.Value, what: str) -> tuple[Dim, ...]:
    try:
        return algebra.shape_of(value)
    except Unknown as e:
        raise GiveUp(f"batch and heads are merged, and the shape of {what} is not known ({e})") from None


def _merged(algebra: MaskAlgebra, merged: ir.Value, what: str) -> tuple[ir.Value, tuple[Dim, ...]]:
    """The [B, H, S, D] tensor a Reshape merged into `merged` [B*H, S, D], and its shape."""
    reshape = producer(merged, "Reshape")
    if reshape is None:
        raise GiveUp(f"batch and heads are merged, and {what} does not come from a Reshape")
    full, flat = _shape(algebra, reshape.inputs[0], what), _shape(algebra, merged, what)
    if len(full) != 4 or len(flat) != 3 or not _product_is(full[0], full[1], flat[0]) or full[2:] != flat[1:]:
        raise GiveUp(f"cannot prove that the Reshape of {what} only merges batch and heads")
    return reshape.inputs[0], full


def _product_is(a: Dim, b: Dim, c: Dim) -> bool:
    try:
        return a * b == c
    except Unknown:
        return False


def prove(
    algebra: MaskAlgebra,
    q3: ir.Value,
    k3_t: ir.Value,
    split_scores: ir.Node,
    merge_probs: ir.Node,
    pv: ir.Node,
) -> MergedHeads:
    """The 4-D Q, K, V and output of MatMul(Q3, K3^T) -> split -> Softmax -> merge -> pv =
    MatMul(P3, V3). The merged scores are [B*H, Sq, Sk] (the terms added to them are checked
    to broadcast into that: check_term), so a split to [B, H, Sq, x] has x = Sk (the element
    count is kept); likewise a merge of the probabilities to [B*H, Sq, x]. The op's Y then
    replaces pv's output, merged again (`output`, `finish`); where the probabilities' merge is
    not proven, a split of pv's output to [B, H, Sq, Dv] is (pv multiplies the merge by V3
    [B*H, Sk, Dv]: any other merge fails to run or breaks that split), and Y replaces it."""
    transpose = producer(k3_t, "Transpose")
    if transpose is None or attr(transpose, "perm") != [0, 2, 1]:
        raise GiveUp("batch and heads are merged, and K^T is not a Transpose of the merged keys")
    query, q_shape = _merged(algebra, q3, "the query")
    key, k_shape = _merged(algebra, transpose.inputs[0], "the key")
    value, v_shape = _merged(algebra, pv.inputs[1], "the value")
    batch_heads = (q_shape[0], q_shape[1])
    if (k_shape[0], k_shape[1]) != batch_heads or (v_shape[0], v_shape[1]) != batch_heads:
        raise GiveUp("batch and heads are merged, and query, key and value differ in batch or heads")
    if k_shape[2] != v_shape[2]:
        raise GiveUp("batch and heads are merged, and key and value differ in length")
    scores = _shape(algebra, split_scores.outputs[0], "the scores")
    if len(scores) != 4 or (scores[0], scores[1], scores[2]) != (*batch_heads, q_shape[2]):
        raise GiveUp("cannot prove that the scores are split into the query's batch and heads")
    heads = MergedHeads(query, key, value, pv.outputs[0], batch_heads, q_shape[2], k_shape[2])
    for probs in (_target(algebra, merge_probs), _proven(algebra, merge_probs.outputs[0])):
        if len(probs) == 3 and probs[0] is not None and _product_is(*batch_heads, probs[0]):
            if probs[1] == q_shape[2]:
                return heads  # Y is merged back into pv's output (`finish`)
    split_out = single_consumer(pv.outputs[0])
    out = ()
    if split_out is not None and split_out.op_type == "Reshape":
        out = _shape(algebra, split_out.outputs[0], "the output")
    if out != (*batch_heads, q_shape[2], v_shape[3]):
        raise GiveUp("cannot prove that the probabilities or the output keep batch and heads apart")
    heads.output, heads.split_output = split_out.outputs[0], True
    return heads


def _proven(algebra: MaskAlgebra, value: ir.Value) -> tuple[Dim, ...]:
    """The value's shape where the size algebra proves it (a -1 in the Reshape resolved), else ()."""
    try:
        return algebra.shape_of(value)
    except Unknown:
        return ()


def _target(algebra: MaskAlgebra, reshape: ir.Node) -> tuple[Dim | None, ...]:
    """A Reshape's output dims as its shape input states them (None for -1 and 0, whose size
    depends on the input), or () when that input is not known."""
    try:
        target = algebra.eval(reshape.inputs[1]).values.reshape(-1)
    except (Unknown, AttributeError):
        return ()
    return tuple(None if Dim.of(d) in (Dim(-1), Dim(0)) else Dim.of(d) for d in target)


def merge_output(builder: Builder, y: ir.Value) -> ir.Value:
    """Y [B, H, Sq, Dv] as the [B*H, Sq, Dv] the graph's pv MatMul computed."""
    rest = builder.op("Slice", [builder.op("Shape", [y]), builder.ints([2]), builder.ints([4])])
    return builder.op("Reshape", [y, builder.op("Concat", [builder.ints([-1]), rest], axis=0)])


def check_term(algebra: MaskAlgebra, term: ir.Value, heads: MergedHeads) -> None:
    """A term added to the merged scores must be [n, Sq | 1, Sk | 1]: then the scores keep their
    shape (n is 1 or B*H, or the graph's Add would not run) and the op can read it as 4-D."""
    shape = _shape(algebra, term, "a term added to the merged scores")
    one = Dim(1)
    if len(shape) != 3 or shape[1] not in (one, heads.q_len) or shape[2] not in (one, heads.kv_len):
        raise GiveUp("a term added to the merged scores is not [batch * heads or 1, rows, keys]")


def unmerge_plan(
    algebra: MaskAlgebra, term: ir.Value, heads: MergedHeads, q3: ir.Value
) -> Callable[[Builder], ir.Value]:
    """What makes a checked term 4-D in the rewrite step: [1, r, c] -> [1, 1, r, c]; otherwise
    [n, r, c] broadcast to [B*H, r, c] (B*H from the merged query q3; nothing to broadcast
    where n is proven B*H) -> [B, H, r, c] (B and H from the 4-D query)."""
    n = algebra.shape_of(term)[0]
    broadcast_all, merged = n == Dim(1), _product_is(*heads.batch_heads, n)

    def build(builder: Builder) -> ir.Value:
        if broadcast_all:
            return builder.op("Unsqueeze", [term, builder.ints([0])])
        value = term
        if not merged:
            bh = builder.op("Slice", [builder.op("Shape", [q3]), builder.ints([0]), builder.ints([1])])
            value = builder.op("Expand", [term, builder.op("Concat", [bh, builder.ints([1, 1])], axis=0)])
        shape = builder.op("Shape", [heads.query])
        batch_heads = builder.op("Slice", [shape, builder.ints([0]), builder.ints([2])])
        rest = builder.op("Slice", [builder.op("Shape", [term]), builder.ints([1]), builder.ints([3])])
        return builder.op("Reshape", [value, builder.op("Concat", [batch_heads, rest], axis=0)])

    return build
