"""com.microsoft.GroupQueryAttention (onnxruntime-genai's builder emits one per layer) becomes
ai.tfsa::SparseGroupQueryAttention: the same inputs, outputs and attributes, plus the sparsity
attributes. The node is swapped in place; the KV cache, rotary embedding and padding
(seqlens_k) stay the op's business exactly as they were GQA's.

Pattern: the anchor node. Check: every input, output and attribute the node uses is one the
new op implements identically (anything else is a GiveUp naming it, and the node is left as it
is). Rewrite: one new node with the node's own values.
"""

from __future__ import annotations

import math
from typing import Any

import onnx_ir as ir

from tfsa_onnx import DOMAIN, GQA_OP_TYPE, OP_VERSION
from tfsa_onnx.config import attribute_value
from tfsa_onnx.opmodel import GQA_INPUTS, GQA_OUTPUTS
from tfsa_onnx.rewrite.common import FLOAT_TYPES, GiveUp, Match, OpRule, attr, dims, optional_input

# GroupQueryAttention's inputs as ORT 1.32 defines them; the new op takes the first nine.
INPUTS = (
    *GQA_INPUTS,
    "position_ids",
    "attention_bias",
    "head_sink",
    "k_scale",
    "v_scale",
    "q_norm_weight",
    "k_norm_weight",
    "query_seqlens",
)
SUPPORTED_INPUTS = len(GQA_INPUTS)
TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)  # the op's kernels (custom_ops/src/register.cc)
OUTPUTS = GQA_OUTPUTS  # output_qk (the 4th) is not supported
# Attributes carried over unchanged, and those accepted only at the value that changes nothing
# (GQA's default). Any other attribute (one a later ORT adds) is refused by name.
KEPT = (
    "num_heads",
    "kv_num_heads",
    "scale",
    "local_window_size",
    "do_rotary",
    "rotary_interleaved",
    "softcap",
)
NEUTRAL: dict[str, Any] = {
    "smooth_softmax": 0,
    "qk_output": 0,
    "causal": 1,
    "sliding_window_cache": 0,
    "k_quant_type": "NONE",
    "v_quant_type": "NONE",
}
# Only read with q_norm_weight/k_norm_weight, which are refused: dropping them changes nothing.
IGNORED = ("qk_norm_epsilon", "q_norm_epsilon", "k_norm_epsilon")
WHY = {
    "smooth_softmax": "smooth_softmax is not supported",
    "qk_output": "qk_output (the QK matrix as an output) is not supported",
    "causal": "non-causal (causal=0) GroupQueryAttention is not supported",
    "sliding_window_cache": "a window-sized KV cache (sliding_window_cache=1) is not supported",
    "k_quant_type": "a quantized KV cache is not supported",
    "v_quant_type": "a quantized KV cache is not supported",
}


class GroupQueryAttentionRule(OpRule):
    """com.microsoft.GroupQueryAttention -> ai.tfsa::SparseGroupQueryAttention, node for node."""

    family = "ort-gqa"
    anchor_op = "GroupQueryAttention"
    anchor_domains = ("com.microsoft",)

    def match(self, node: ir.Node) -> Match:
        check(node)
        heads, kv_heads = attr(node, "num_heads"), attr(node, "kv_num_heads")
        head_dim = _head_dim(node, heads, kv_heads)
        match = Match(
            query=node.inputs[0],
            key=optional_input(node, 1) or node.inputs[0],
            value=optional_input(node, 2) or node.inputs[0],
            output=node.outputs[0],
            scale=attr(node, "scale", 0.0) or None,
            is_causal=True,
            head_dim=head_dim,
            heads=heads,
            kv_heads=kv_heads,
        )
        match.rewrite = lambda graph, tunables: rewrite(graph, node, tunables)
        return match


def check(node: ir.Node) -> None:
    """GiveUp naming the first setting of the node the new op does not implement."""
    for i in range(SUPPORTED_INPUTS, len(node.inputs)):
        if node.inputs[i] is not None:
            name = INPUTS[i] if i < len(INPUTS) else f"input {i}"
            raise GiveUp(f"the {name} input is not supported")
    for i, out in enumerate(node.outputs[len(OUTPUTS) :], start=len(OUTPUTS)):
        if out is not None and (out.uses() or out.is_graph_output()):
            raise GiveUp(f"output {i} (output_qk) is not supported")
    if attr(node, "kv_cache_bit_width") is not None:
        raise GiveUp("a quantized KV cache (kv_cache_bit_width) is not supported")
    for name in node.attributes:
        if name in KEPT or name in IGNORED:
            continue
        if name not in NEUTRAL:
            raise GiveUp(f"attribute {name} is not supported")
    for name, neutral in NEUTRAL.items():
        value = attr(node, name, neutral)
        if value != neutral:
            raise GiveUp(f"{WHY[name]} ({name}={value!r})")
    for i in (0, 3, 4):
        value = optional_input(node, i)
        if value is not None and value.dtype is not None and value.dtype not in TYPES:
            what = "a quantized KV cache" if i and value.dtype not in FLOAT_TYPES else "the element type"
            raise GiveUp(f"{what} ({INPUTS[i]} is {value.dtype.name}) is not supported")
    if attr(node, "num_heads") is None or attr(node, "kv_num_heads") is None:
        raise GiveUp("num_heads and kv_num_heads are required")
    softcap = attr(node, "softcap", 0.0)  # carried over: the op caps the scores as ORT does
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise GiveUp(f"softcap={softcap!r} is not a finite value >= 0")


def rewrite(graph: ir.Graph, node: ir.Node, tunables: dict[str, Any]) -> ir.Node:
    """Insert the new node before `node`, move every use of node's outputs to it, keep the names."""
    inputs = list(node.inputs[:SUPPORTED_INPUTS])
    while inputs and inputs[-1] is None:
        inputs.pop()
    attributes = {k: node.attributes[k] for k in KEPT if k in node.attributes}
    for key, val in tunables.items():
        if val != ():  # an empty list setting (head_thresholds) is no attribute
            attributes[key] = ir.convenience.convert_attribute(key, attribute_value(val))
    new = ir.Node(
        DOMAIN,
        GQA_OP_TYPE,
        inputs,
        attributes=list(attributes.values()),
        num_outputs=min(len(node.outputs), len(OUTPUTS)),
        name=node.name,
        version=OP_VERSION,
    )
    graph.insert_before(node, new)
    for old, out in zip(node.outputs, new.outputs, strict=False):
        out.type, out.shape = old.type, old.shape
        name = old.name
        was_output = old.is_graph_output()
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        old.name = f"{name}_replaced"
        out.name = name
        if was_output:
            out.meta["tfsa_replaces"] = old
    graph.remove(node, safe=True)
    return new


def _head_dim(node: ir.Node, heads: int | None, kv_heads: int | None) -> int | None:
    """From the query's last dim: [B, S, Hq*D], or packed [B, S, (Hq + 2 Hkv)*D] without key."""
    last = (dims(node.inputs[0]) or [None])[-1]
    if not isinstance(last, int) or not heads:
        return None
    parts = heads if optional_input(node, 1) is not None else heads + 2 * (kv_heads or 0)
    return last // parts if last % parts == 0 else None
