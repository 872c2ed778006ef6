"""Single-node models of ai.tfsa::SparseAttention (and of dense baselines) for tests and benchmarks."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from tfsa_onnx import DOMAIN, OP_TYPE, OP_VERSION

_DIMS = {
    "query": ["batch", "q_heads", "q_len", "head_dim"],
    "key": ["batch", "kv_heads", "kv_len", "head_dim"],
    "value": ["batch", "kv_heads", "kv_len", "v_head_dim"],
}


def sparse_attention_model(
    dtype: int = TensorProto.FLOAT,
    mask_dtype: int | None = None,
    mask_rank: int = 4,
    density_output: bool = True,
    **attributes,
) -> onnx.ModelProto:
    """query/key/value (+ attn_mask) -> SparseAttention -> Y (+ density), symbolic dims."""
    inputs = [helper.make_tensor_value_info(n, dtype, dims) for n, dims in _DIMS.items()]
    names = list(_DIMS)
    if mask_dtype is not None:
        dims = [f"mask_{i}" for i in range(mask_rank)]
        inputs.append(helper.make_tensor_value_info("attn_mask", mask_dtype, dims))
        names.append("attn_mask")
    outputs = [helper.make_tensor_value_info("Y", dtype, ["batch", "q_heads", "q_len", "v_head_dim"])]
    if density_output:
        outputs.append(helper.make_tensor_value_info("density", TensorProto.FLOAT, ["batch", "q_heads"]))
    node = helper.make_node(
        OP_TYPE, names, [o.name for o in outputs], domain=DOMAIN, name="sparse_attention", **attributes
    )
    graph = helper.make_graph([node], "sparse_attention", inputs, outputs)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, OP_VERSION)]
    return helper.make_model(graph, opset_imports=opsets)


def numpy_dtype(dtype: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(dtype))
