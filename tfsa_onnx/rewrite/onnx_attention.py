"""The standard ONNX Attention op (opset 23): 4-D inputs, or 3-D with q_num_heads/kv_num_heads.

Same math as SparseAttention (bool masks: true = attend; softcap capping the scaled scores
before the mask, as ONNX's specification and onnxruntime 1.32's kernel do). Past key/value and
extra outputs are not supported. ONNX aligns is_causal top-left while the op aligns it
bottom-right, so is_causal is only taken over when Sq == Sk is provable.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from tfsa_onnx.rewrite.common import (
    GiveUp,
    Inputs,
    Match,
    OpRule,
    attr,
    dims,
    fold_repeat,
    merge_heads,
    op_match,
    optional_input,
    outputs_unused,
    rank,
    same_dim,
    split_heads,
)


class OnnxAttentionRule(OpRule):
    family = "onnx-attention"
    anchor_op = "Attention"

    def match(self, node: ir.Node) -> Match:
        _check_supported(node)
        q, k, v = node.inputs[:3]
        r = rank(q)
        if r not in (3, 4) or rank(k) != r or rank(v) != r:
            raise GiveUp(f"Q, K, V ranks {rank(q)}, {rank(k)}, {rank(v)}: expected all 3 or all 4")
        is_causal = bool(attr(node, "is_causal", 0))
        if is_causal and not same_dim((dims(q) or [None] * 3)[-2], (dims(k) or [None] * 3)[-2]):
            raise GiveUp("is_causal with query and key lengths not provably equal (ONNX aligns it top-left)")
        mask = optional_input(node, 3)
        additive = mask is not None and mask.dtype != ir.DataType.BOOL
        match = op_match(
            node,
            q,
            k,
            v,
            mask=mask,
            mask_additive=additive,
            is_causal=is_causal,
            softcap=attr(node, "softcap", 0.0) or None,
        )
        if r == 4:
            folded_k, folded_v = fold_repeat(k), fold_repeat(v)
            if folded_k is not k and folded_v is not v:
                match.key, match.value = folded_k, folded_v
            return match
        hq, hkv = attr(node, "q_num_heads"), attr(node, "kv_num_heads")
        if not hq or not hkv:
            raise GiveUp("3-D inputs without q_num_heads/kv_num_heads")
        packed = (dims(q) or [None])[-1]
        match.heads, match.kv_heads = hq, hkv
        match.head_dim = packed // hq if isinstance(packed, int) else None
        match.length_axes = (1, 1)
        match.inputs = lambda b: Inputs(split_heads(b, q, hq), split_heads(b, k, hkv), split_heads(b, v, hkv))
        match.finish = merge_heads
        return match


def _check_supported(node: ir.Node) -> None:
    if optional_input(node, 4) is not None or optional_input(node, 5) is not None:
        raise GiveUp("past key/value inputs (KV cache) are not supported")
    if optional_input(node, 6) is not None:
        raise GiveUp("nonpad_kv_seqlen is not supported")
    softcap = attr(node, "softcap", 0.0)
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise GiveUp(f"softcap={softcap!r} is not a finite value >= 0")
    if not outputs_unused(node, 1):
        raise GiveUp("present key/value or QK outputs are used")
