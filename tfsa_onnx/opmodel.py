"""Single-node ONNX models for the tests and benchmarks: ai.tfsa::SparseAttention and
SparseGroupQueryAttention, and the dense baselines they are timed against
(com.microsoft.MultiHeadAttention and GroupQueryAttention, the unfused MatMul-Softmax-MatMul)."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper

from tfsa_onnx import DOMAIN, GQA_OP_TYPE, OP_TYPE, OP_VERSION

_DIMS = {
    "query": ["batch", "q_heads", "q_len", "head_dim"],
    "key": ["batch", "kv_heads", "kv_len", "head_dim"],
    "value": ["batch", "kv_heads", "kv_len", "v_head_dim"],
}


def _given(attributes: dict) -> dict:
    """The attributes a node gets: an empty list (head_thresholds: none) is no attribute."""
    return {k: v for k, v in attributes.items() if not (isinstance(v, (list, tuple)) and len(v) == 0)}


def sparse_attention_model(
    dtype: int = TensorProto.FLOAT,
    mask_dtype: int | None = None,
    mask_rank: int = 4,
    density_output: bool = True,
    bias_dtype: int | None = None,
    bias_rank: int = 4,
    **attributes,
) -> onnx.ModelProto:
    """query/key/value (+ attn_mask) (+ attn_bias) -> SparseAttention -> Y (+ density), symbolic dims."""
    inputs = [helper.make_tensor_value_info(n, dtype, dims) for n, dims in _DIMS.items()]
    names = list(_DIMS)
    if mask_dtype is not None:
        dims = [f"mask_{i}" for i in range(mask_rank)]
        inputs.append(helper.make_tensor_value_info("attn_mask", mask_dtype, dims))
        names.append("attn_mask")
    if bias_dtype is not None:
        dims = [f"bias_{i}" for i in range(bias_rank)]
        inputs.append(helper.make_tensor_value_info("attn_bias", bias_dtype, dims))
        names += ([] if mask_dtype is not None else [""]) + ["attn_bias"]
    outputs = [helper.make_tensor_value_info("Y", dtype, ["batch", "q_heads", "q_len", "v_head_dim"])]
    if density_output:
        outputs.append(helper.make_tensor_value_info("density", TensorProto.FLOAT, ["batch", "q_heads"]))
    node = helper.make_node(
        OP_TYPE,
        names,
        [o.name for o in outputs],
        domain=DOMAIN,
        name="sparse_attention",
        **_given(attributes),
    )
    graph = helper.make_graph([node], "sparse_attention", inputs, outputs)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, OP_VERSION)]
    return helper.make_model(graph, opset_imports=opsets)


GQA_INPUTS = (
    "query",
    "key",
    "value",
    "past_key",
    "past_value",
    "seqlens_k",
    "total_sequence_length",
    "cos_cache",
    "sin_cache",
)
GQA_OUTPUTS = ("output", "present_key", "present_value")


def group_query_attention_model(
    domain: str = "com.microsoft",
    dtype: int = TensorProto.FLOAT,
    packed: bool = False,
    past: bool = True,
    rotary: bool = True,
    density: bool = False,
    **attributes,
) -> onnx.ModelProto:
    """One com.microsoft.GroupQueryAttention node (domain "com.microsoft"), or the same as
    ai.tfsa::SparseGroupQueryAttention (domain DOMAIN), with every input but the ones `packed`,
    `past` and `rotary` leave out; shapes are left to the kernels. `density` adds our op's
    density output."""
    present = set(GQA_INPUTS) - ({"key", "value"} if packed else set())
    present -= set() if past else {"past_key", "past_value"}
    present -= set() if rotary else {"cos_cache", "sin_cache"}
    names = [n if n in present else "" for n in GQA_INPUTS]
    while names[-1] == "":
        names.pop()
    int_inputs = ("seqlens_k", "total_sequence_length")
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT32 if n in int_inputs else dtype, None)
        for n in names
        if n
    ]
    outputs = [helper.make_tensor_value_info(n, dtype, None) for n in GQA_OUTPUTS]
    if density:
        outputs.append(helper.make_tensor_value_info("density", TensorProto.FLOAT, None))
    op_type = "GroupQueryAttention" if domain == "com.microsoft" else GQA_OP_TYPE
    out_names = [o.name for o in outputs]
    node = helper.make_node(op_type, names, out_names, domain=domain, name="gqa", **_given(attributes))
    graph = helper.make_graph([node], "gqa", inputs, outputs)
    version = 1 if domain == "com.microsoft" else OP_VERSION
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(domain, version)]
    return helper.make_model(graph, opset_imports=opsets)


def mha_model(heads: int, causal: bool) -> onnx.ModelProto:
    """com.microsoft.MultiHeadAttention on [B, S, H*D] query/key/value."""
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", "hidden"]) for n in "qkv"]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", "hidden"])
    node = helper.make_node(
        "MultiHeadAttention",
        ["q", "k", "v"],
        ["y"],
        domain="com.microsoft",
        num_heads=heads,
        unidirectional=int(causal),
    )
    graph = helper.make_graph([node], "mha", io, [out])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def unfused_model(seq_len: int, head_dim: int, causal: bool) -> onnx.ModelProto:
    """MatMul(Q, K^T) * scale (+ causal mask) -> Softmax -> MatMul(V) on [B, H, S, D]."""
    dims = ["batch", "heads", "seq", "head_dim"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in ("query", "key", "value")]
    out = helper.make_tensor_value_info("Y", TensorProto.FLOAT, dims)
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [1.0 / math.sqrt(head_dim)])
    nodes = [
        helper.make_node("Transpose", ["key"], ["key_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["query", "key_t"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
    ]
    inits = [scale]
    logits = "scaled"
    if causal:
        mask = np.triu(np.full((seq_len, seq_len), -np.inf, np.float32), k=1)
        inits.append(onnx.numpy_helper.from_array(mask, "causal_mask"))
        nodes.append(helper.make_node("Add", ["scaled", "causal_mask"], ["masked"]))
        logits = "masked"
    nodes += [
        helper.make_node("Softmax", [logits], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "value"], ["Y"]),
    ]
    graph = helper.make_graph(nodes, "unfused", inputs, [out], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
