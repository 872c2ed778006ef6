"""Site names are stable from run to run, so configs can select layers by name."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

import tfsa_onnx
from tfsa_onnx.config import SparsityConfig


def _unnamed_attention() -> onnx.ModelProto:
    """MatMul -> Mul -> Softmax -> MatMul with no node names at all."""
    nodes = [
        helper.make_node("Transpose", ["k"], ["k_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "k_t"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["y"]),
    ]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, "S", 8]) for n in "qkv"]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, "S", 8])
    scale = onnx.numpy_helper.from_array(np.array(0.35, np.float32), "scale")
    graph = helper.make_graph(nodes, "g", io, [out], initializer=[scale])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_unnamed_sites_get_the_same_name_every_run_and_configs_can_use_it():
    model = _unnamed_attention()
    names = [[s.name for s in tfsa_onnx.optimize(model, None)[1].sites] for _ in range(2)]
    assert names[0] == names[1] == ["Softmax_probs"]
    config = SparsityConfig(layers={"Softmax_pro*": {"skip": True}})
    _, report = tfsa_onnx.optimize(model, config)
    assert [s.replaced for s in report.sites] == [False]
