"""com.microsoft.Attention and com.microsoft.MultiHeadAttention (onnxruntime's fusions).

Both take packed [B, S, H*D] tensors: the rewrite splits heads before the op and merges
them after. Their key-padding masks (mask_index [B] = valid lengths, or raw [B, S] 0/1)
become a bool [B, 1, 1, S] mask; attention_bias becomes the additive mask.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from tfsa_onnx.rewrite.common import (
    Builder,
    GiveUp,
    Inputs,
    Match,
    OpRule,
    attr,
    const_array,
    dims,
    merge_heads,
    op_match,
    optional_input,
    outputs_unused,
    producer,
    rank,
    same_dim,
    split_heads,
)


class OrtAttentionRule(OpRule):
    """com.microsoft.Attention: input x weights (+ bias) -> Q, K, V, then attention."""

    family = "ort-attention"
    anchor_op = "Attention"
    anchor_domains = ("com.microsoft",)

    def match(self, node: ir.Node) -> Match:
        x, weights, bias = node.inputs[:3]
        for i, what in ((4, "past state"), (6, "past_sequence_length")):
            if optional_input(node, i) is not None:
                raise GiveUp(f"{what} input (KV cache) is not supported")
        if attr(node, "do_rotary", 0) or attr(node, "past_present_share_buffer", 0):
            raise GiveUp("rotary or shared-buffer Attention is not supported")
        if not outputs_unused(node, 1):
            raise GiveUp("the present output is used")
        w = dims(weights)
        if w is None or len(w) != 2 or not isinstance(w[1], int):
            raise GiveUp("weights shape is not static [hidden, 3 * hidden]")
        sizes = list(attr(node, "qkv_hidden_sizes") or [w[1] // 3] * 3)
        heads = attr(node, "num_heads")
        key_mask, attention_bias = optional_input(node, 3), optional_input(node, 5)
        _check_mask(key_mask, attention_bias, x)

        def inputs(builder: Builder) -> Inputs:
            qkv = builder.op("MatMul", [x, weights])
            if bias is not None:
                qkv = builder.op("Add", [qkv, bias])
            parts = builder.op("Split", [qkv, builder.ints(sizes, "qkv_sizes")], axis=-1, num_outputs=3)
            return Inputs(*(split_heads(builder, t, heads) for t in parts))

        match = _match(node, None, None, key_mask, attention_bias, weights.dtype)
        match.inputs, match.heads, match.kv_heads, match.head_dim = inputs, heads, heads, sizes[0] // heads
        return match


class OrtMultiHeadAttentionRule(OpRule):
    """com.microsoft.MultiHeadAttention with separate 3-D query, key, value (+ packed bias)."""

    family = "ort-multihead-attention"
    anchor_op = "MultiHeadAttention"
    anchor_domains = ("com.microsoft",)

    def match(self, node: ir.Node) -> Match:
        q, k, v = (optional_input(node, i) for i in range(3))
        bias = optional_input(node, 3)
        if k is None or v is None or not all(_is_3d(t) for t in (q, k, v)):
            raise GiveUp("packed or 4-D key/value inputs are not supported (only 3-D Q, K, V)")
        for i in (6, 7, 8, 9):
            if optional_input(node, i) is not None:
                raise GiveUp("past key/value inputs (KV cache) are not supported")
        if not outputs_unused(node, 1):
            raise GiveUp("present key/value outputs are used")
        heads = attr(node, "num_heads")
        parts = _packed_bias(bias) if bias is not None else None
        key_mask, attention_bias = optional_input(node, 4), optional_input(node, 5)
        _check_mask(key_mask, attention_bias, q)

        def inputs(builder: Builder) -> Inputs:
            qkv = (q, k, v)
            if parts is not None:
                pairs = zip(qkv, parts, strict=True)
                qkv = [builder.op("Add", [t, builder.const(p, "bias")]) for t, p in pairs]
            return Inputs(*(split_heads(builder, t, heads) for t in qkv))

        match = _match(node, q, k, key_mask, attention_bias, bias.dtype if bias is not None else None)
        match.inputs, match.heads, match.kv_heads = inputs, heads, heads
        b = dims(bias) if bias is not None else None
        if b and isinstance(b[0], int):
            match.head_dim = b[0] // 3 // heads
        return match


def _match(node: ir.Node, q, k, key_mask: ir.Value | None, attention_bias: ir.Value | None, dtype) -> Match:
    """The Match of both ops. attention_bias is the graph's additive mask (analysed); a key
    padding mask becomes the op's bool mask in the rewrite step. q, k: the packed [B, S, H*D]
    inputs where the op has them (their length axis is 1)."""
    x = node.inputs[0]
    keys = k if k is not None else x  # Attention's keys are as long as its input
    return op_match(
        node,
        q,
        k,
        None,
        mask=attention_bias,
        mask_additive=True,
        is_causal=bool(attr(node, "unidirectional", 0)),
        length_axes=(1, 1),
        implied_mask=None if key_mask is None else (lambda builder: _key_padding(builder, key_mask, x, keys)),
        finish=merge_heads,
        dtype=dtype,
    )


def _packed_bias(bias: ir.Value) -> list[np.ndarray]:
    """The Q, K and V parts of a constant packed bias."""
    b = const_array(bias)
    if b is None or b.ndim != 1 or b.size % 3:
        raise GiveUp("the packed bias is not a constant of 3 equal parts")
    return np.split(b, 3)


def _mask_kind(key_mask: ir.Value, x: ir.Value) -> str | None:
    """ "raw" for a [B, S] 0/1 mask, "lengths" for a [B] mask_index (end positions: keys at and
    past it are masked), None for the other mask_index forms ([2B] or [3B + 2] start/end
    positions, 3-D / 4-D masks). `x`: the op's [B, S, ...] input, for the batch size."""
    r = rank(key_mask)
    if r == 2:
        return "raw"
    if r in (1, None) and _is_lengths(key_mask, x):
        return "lengths"
    return None


def _check_mask(key_mask: ir.Value | None, bias: ir.Value | None, x: ir.Value) -> None:
    """GiveUp unless _key_padding can take this key-padding mask and/or attention_bias."""
    if key_mask is not None and bias is not None:
        raise GiveUp("both a key padding mask and attention_bias: not supported")
    if key_mask is None or bias is not None:
        return
    if _mask_kind(key_mask, x) is None:
        r = rank(key_mask)
        raise GiveUp(
            f"mask_index of rank {r} is not supported (only [B] lengths or [B, S] 0/1)"
            if r != 1
            else "mask_index of rank 1 is not provably [B] lengths (start/end positions are not supported)"
        )


def _key_padding(builder: Builder, key_mask: ir.Value, x: ir.Value, keys: ir.Value) -> ir.Value:
    """The op's bool [B, 1, 1, S] mask from a key-padding mask _check_mask accepted.
    `keys`: a [B, S, ...] value as long as the keys."""
    if _mask_kind(key_mask, x) == "raw":
        zero = builder.const(np.zeros((), key_mask.dtype.numpy()), "zero")
        allowed = builder.op("Not", [builder.op("Equal", [key_mask, zero])])
        return builder.op("Unsqueeze", [allowed, builder.ints([1, 2], "axes")])
    length = builder.op("Shape", [keys], start=1, end=2)
    positions = builder.op("Range", [_scalar(builder, 0), _squeeze(builder, length), _scalar(builder, 1)])
    lens = builder.op("Cast", [key_mask], to=ir.DataType.INT64)
    lens = builder.op("Reshape", [lens, builder.ints([-1, 1, 1, 1])])
    return builder.op("Less", [positions, lens])


def _is_3d(value: ir.Value) -> bool:
    """[B, S, H*D]; contrib producers have no inferred shape, but a projection is 3-D."""
    r = rank(value)
    if r is not None:
        return r == 3
    node = value.producer()
    return node is not None and node.op_type in ("MatMul", "Add") and rank(node.inputs[1]) in (1, 2)


def _is_lengths(mask: ir.Value, x: ir.Value) -> bool:
    """mask_index has B elements (so it holds end positions, not [2B] start and end): it is
    EmbedLayerNormalization's, its shape is x's batch, or it is ReduceSum(keepdims=0) over axis 1
    of a [B, S] mask (onnxruntime's fusion of attention_mask without EmbedLayerNormalization)."""
    node = mask.producer()
    if node is not None and node.op_type == "EmbedLayerNormalization" and mask is node.outputs[1]:
        return True
    m, batch = dims(mask), (dims(x) or [None])[0]
    if m is not None and len(m) == 1 and batch is not None and same_dim(m[0], batch):
        return True
    if node is not None and node.op_type == "Cast":
        node = producer(node.inputs[0])
    if node is None or node.op_type != "ReduceSum" or attr(node, "keepdims", 1) != 0:
        return False
    axes = attr(node, "axes")
    if axes is None and len(node.inputs) > 1:
        found = const_array(node.inputs[1])
        axes = None if found is None else [int(a) for a in found.reshape(-1)]
    return rank(node.inputs[0]) == 2 and axes in ([1], [-1])


def _scalar(builder: Builder, x: int) -> ir.Value:
    return builder.const(np.asarray(x, dtype=np.int64), "scalar")


def _squeeze(builder: Builder, v: ir.Value) -> ir.Value:
    return builder.op("Squeeze", [v, builder.ints([0], "axes")])
