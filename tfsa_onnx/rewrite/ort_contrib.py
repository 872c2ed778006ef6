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
    Match,
    attr,
    const_array,
    dims,
    merge_heads,
    optional_input,
    outputs_unused,
    rank,
    split_heads,
)


class OrtAttentionRule:
    """com.microsoft.Attention: input x weights (+ bias) -> Q, K, V, then attention."""

    family = "ort-attention"

    def is_anchor(self, node: ir.Node) -> bool:
        return node.op_type == "Attention" and node.domain == "com.microsoft"

    def match(self, node: ir.Node, builder_factory) -> Match:
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
        sizes = attr(node, "qkv_hidden_sizes") or [w[1] // 3] * 3
        heads = attr(node, "num_heads")
        _check_mask(optional_input(node, 3), optional_input(node, 5))
        builder = builder_factory(node)  # every GiveUp is above: nodes are built only for a match
        qkv = builder.op("MatMul", [x, weights])
        if bias is not None:
            qkv = builder.op("Add", [qkv, bias])
        q, k, v = builder.op("Split", [qkv, builder.ints(list(sizes), "qkv_sizes")], axis=-1, num_outputs=3)
        keys = k
        q, k, v = (split_heads(builder, t, heads) for t in (q, k, v))
        mask = _mask(builder, optional_input(node, 3), optional_input(node, 5), keys)
        match = _match(node, q, k, v, mask, bool(attr(node, "unidirectional", 0)), weights.dtype)
        match.head_dim = sizes[0] // heads
        return match


class OrtMultiHeadAttentionRule:
    """com.microsoft.MultiHeadAttention with separate 3-D query, key, value (+ packed bias)."""

    family = "ort-multihead-attention"

    def is_anchor(self, node: ir.Node) -> bool:
        return node.op_type == "MultiHeadAttention" and node.domain == "com.microsoft"

    def match(self, node: ir.Node, builder_factory) -> Match:
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
        _check_mask(optional_input(node, 4), optional_input(node, 5))
        builder = builder_factory(node)  # every GiveUp is above: nodes are built only for a match
        if parts is not None:
            q, k, v = (
                builder.op("Add", [t, builder.const(p, "bias")])
                for t, p in zip((q, k, v), parts, strict=True)
            )
        keys = k
        q, k, v = (split_heads(builder, t, heads) for t in (q, k, v))
        mask = _mask(builder, optional_input(node, 4), optional_input(node, 5), keys)
        dtype = bias.dtype if bias is not None else None
        match = _match(node, q, k, v, mask, bool(attr(node, "unidirectional", 0)), dtype)
        b = dims(bias) if bias is not None else None
        if b and isinstance(b[0], int):
            match.head_dim = b[0] // 3 // heads
        return match


def _match(node: ir.Node, q, k, v, mask: tuple | None, causal: bool, dtype) -> Match:
    scale = attr(node, "scale", 0.0)
    return Match(
        query=q,
        key=k,
        value=v,
        output=node.outputs[0],
        scale=scale if scale else None,
        mask=mask[0] if mask else None,
        mask_additive=mask[1] if mask else True,
        is_causal=causal,
        finish=merge_heads,
        dtype=dtype,
    )


def _packed_bias(bias: ir.Value) -> list[np.ndarray]:
    """The Q, K and V parts of a constant packed bias."""
    b = const_array(bias)
    if b is None or b.ndim != 1 or b.size % 3:
        raise GiveUp("the packed bias is not a constant of 3 equal parts")
    return np.split(b, 3)


def _mask_rank(key_mask: ir.Value) -> int | None:
    r = rank(key_mask)
    return 1 if r is None and _is_lengths(key_mask) else r


def _check_mask(key_mask: ir.Value | None, bias: ir.Value | None) -> None:
    """GiveUp unless _mask can take this key-padding mask and/or attention_bias."""
    if key_mask is not None and bias is not None:
        raise GiveUp("both a key padding mask and attention_bias: not supported")
    if key_mask is None or bias is not None:
        return
    r = _mask_rank(key_mask)
    if r != 2 and not (r == 1 and _is_lengths(key_mask)):
        raise GiveUp(f"mask_index of rank {r} is not supported (only [B] lengths or [B, S] 0/1)")


def _mask(builder: Builder, key_mask: ir.Value | None, bias: ir.Value | None, keys: ir.Value):
    """(mask value, additive) for the op from a mask _check_mask accepted."""
    if bias is not None:
        return bias, True
    if key_mask is None:
        return None
    r = _mask_rank(key_mask)
    if r == 2:  # raw [B, S] 0/1 mask
        zero = builder.const(np.zeros((), key_mask.dtype.numpy()), "zero")
        allowed = builder.op("Not", [builder.op("Equal", [key_mask, zero])])
        return builder.op("Unsqueeze", [allowed, builder.ints([1, 2], "axes")]), False
    if r == 1 and _is_lengths(key_mask):
        length = builder.op("Shape", [keys], start=1, end=2)
        positions = builder.op("Range", [_scalar(builder, 0), _squeeze(builder, length), _scalar(builder, 1)])
        lens = builder.op("Cast", [key_mask], to=ir.DataType.INT64)
        lens = builder.op("Reshape", [lens, builder.ints([-1, 1, 1, 1])])
        return builder.op("Less", [positions, lens]), False
    raise AssertionError("_check_mask accepts only [B] lengths or [B, S] masks")


def _is_3d(value: ir.Value) -> bool:
    """[B, S, H*D]; contrib producers have no inferred shape, but a projection is 3-D."""
    r = rank(value)
    if r is not None:
        return r == 3
    node = value.producer()
    return node is not None and node.op_type in ("MatMul", "Add") and rank(node.inputs[1]) in (1, 2)


def _is_lengths(mask: ir.Value) -> bool:
    """mask_index [B] (valid lengths, right padding): EmbedLayerNormalization makes one."""
    node = mask.producer()
    return node is not None and node.op_type == "EmbedLayerNormalization" and mask is node.outputs[1]


def _scalar(builder: Builder, x: int) -> ir.Value:
    return builder.const(np.asarray(x, dtype=np.int64), "scalar")


def _squeeze(builder: Builder, v: ir.Value) -> ir.Value:
    return builder.op("Squeeze", [v, builder.ints([0], "axes")])
