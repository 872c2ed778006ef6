"""Families that add a score bias beside the padding mask (MPNet and T5 relative positions,
BLOOM's ALiBi on merged batch and heads): the bias reaches the op's attn_bias input, the
padding stays a mask, causality an attribute, and the optimized model equals the original
when dense."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import feeds, sessions
from onnx import TensorProto, helper
from test_rewrite_families import DENSE, check_structure

import tfsa_onnx
from tfsa_onnx.rewrite import optimize

# (family, dynamo, causal, the op's padding mask and bias at batch 2, length 33): the padding is
# a [B, 1, 1, S] key mask (MPNet's TorchScript export Ands an all-true query term into it, its
# position ids counted with CumSum: proven and dropped); ALiBi is [B, H, 1, S].
CASES = [
    ("mpnet", False, False, (2, 1, 1, 33), (1, 2, 33, 33)),
    ("mpnet", True, False, (2, 1, 1, 33), (1, 2, 33, 33)),
    ("t5-encoder", False, False, (2, 1, 1, 33), (1, 2, 33, 33)),
    ("t5-encoder", True, False, (2, 1, 1, 33), (1, 2, 33, 33)),
    ("bloom", False, True, (2, 1, 1, 33), (2, 2, 1, 33)),
    ("bloom", True, True, (2, 1, 1, 33), (2, 2, 1, 33)),
]


def _runtime_shapes(model: onnx.ModelProto, names: list[str], x: dict) -> dict[str, tuple]:
    """The shapes `names` take when the model runs on `x` (they become extra outputs)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(probe.SerializeToString(), tfsa_onnx.session_options())
    values = session.run(names, x)
    return {n: v.shape for n, v in zip(names, values, strict=True)}


@pytest.mark.parametrize("family,dynamo,causal,mask_shape,bias_shape", CASES, ids=lambda x: str(x))
def test_position_bias_families_are_replaced_and_exact(
    exports, family, dynamo, causal, mask_shape, bias_shape
) -> None:
    path = exports.get(family, "eager", dynamo, None if dynamo else 17)
    original = onnx.load(str(path))
    optimized, report = optimize(path, DENSE)
    check_structure(original, optimized, layers=2)
    for site in report.sites:
        assert site.replaced, site.reason
        assert (site.heads, site.kv_heads, site.head_dim) == (2, 2, 16)
        assert site.masked and site.causal == causal
        assert any("attn_bias" in note for note in site.notes)
    a, b = sessions(original, optimized)
    for seq in (5, 16, 33):
        x = feeds(a, seq)  # the second row is padded
        np.testing.assert_allclose(b.run(None, x)[0], a.run(None, x)[0], atol=1e-4, rtol=0)

    nodes = [n for n in optimized.graph.node if n.op_type == "SparseAttention"]
    assert all(len(n.input) == 5 and n.input[4] for n in nodes)
    shapes = _runtime_shapes(optimized, [nodes[0].input[3], nodes[0].input[4]], feeds(a, 33))
    assert shapes[nodes[0].input[3]] == mask_shape
    assert shapes[nodes[0].input[4]] == bias_shape


def _two_term_model(second_term_negative: bool) -> onnx.ModelProto:
    """softmax(Q K^T + bias + m) V, with `bias` computed from an input's values (no shape
    proof can drop it) and m a padding mask from another input."""
    f = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("q", f, [1, 2, "s", 8]),
        helper.make_tensor_value_info("k", f, [1, 2, "s", 8]),
        helper.make_tensor_value_info("v", f, [1, 2, "s", 8]),
        helper.make_tensor_value_info("b", f, [1, 2, "s", "s"]),
        helper.make_tensor_value_info("pad", f, [1, 1, 1, "s"]),
    ]
    neg = -1e9 if second_term_negative else 0.5
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"]),
        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", f, [], [0.25])),
        helper.make_node("Mul", ["qk", "c"], ["s"]),
        helper.make_node("Constant", [], ["two"], value=helper.make_tensor("two", f, [], [2.0])),
        helper.make_node("Mul", ["b", "two"], ["bias"]),
        helper.make_node("Add", ["s", "bias"], ["sb"]),
        helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one", f, [], [1.0])),
        helper.make_node("Sub", ["one", "pad"], ["inv"]),
        helper.make_node("Constant", [], ["neg"], value=helper.make_tensor("neg", f, [], [neg])),
        helper.make_node("Mul", ["inv", "neg"], ["m"]),
        helper.make_node("Add", ["sb", "m"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"]),
    ]
    out = helper.make_tensor_value_info("y", f, [1, 2, "s", 8])
    graph = helper.make_graph(nodes, "two_terms", inputs, [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_additive_graph_input_stays_the_mask() -> None:
    # softmax(Q K^T / 4 + m) V with m fed by the caller: a mask (its -inf blocks are skipped).
    f = TensorProto.FLOAT
    names = ("q", "k", "v")
    inputs = [helper.make_tensor_value_info(n, f, [1, 2, "s", 8]) for n in names]
    inputs.append(helper.make_tensor_value_info("m", f, [1, 1, 1, "s"]))
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"]),
        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", f, [], [0.25])),
        helper.make_node("Mul", ["qk", "c"], ["s"]),
        helper.make_node("Add", ["s", "m"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"]),
    ]
    out = helper.make_tensor_value_info("y", f, [1, 2, "s", 8])
    model = helper.make_model(
        helper.make_graph(nodes, "input_mask", inputs, [out]), opset_imports=[helper.make_opsetid("", 17)]
    )
    optimized, report = optimize(model, DENSE)
    assert report.sites[0].replaced and report.sites[0].masked, report.sites[0].reason
    node = next(n for n in optimized.graph.node if n.op_type == "SparseAttention")
    assert list(node.input[3:]) == ["m"]


@pytest.mark.parametrize("negative", [True, False])
def test_terms_split_into_mask_and_bias_stay_exact(negative) -> None:
    # With a large negative the padding term is the mask and `bias` the bias; without one
    # both are biases. Either way every term reaches the scores.
    model = _two_term_model(negative)
    optimized, report = optimize(model, DENSE)
    assert report.sites[0].replaced, report.sites[0].reason
    assert report.sites[0].masked == negative
    node = next(n for n in optimized.graph.node if n.op_type == "SparseAttention")
    assert len(node.input) == 5 and node.input[4]
    assert node.input[3]  # never an empty mask before the bias: onnxruntime 1.17 crashes on it
    rng = np.random.default_rng(0)
    pad = np.ones((1, 1, 1, 21), np.float32)
    pad[..., 15:] = 0
    x = {n: rng.standard_normal((1, 2, 21, 8)).astype(np.float32) for n in "qkv"}
    x |= {"b": rng.standard_normal((1, 2, 21, 21)).astype(np.float32), "pad": pad}
    a, b = sessions(model, optimized)
    np.testing.assert_allclose(b.run(None, x)[0], a.run(None, x)[0], atol=1e-5)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_deberta_v2_disentangled_attention_is_replaced(exports, dynamo) -> None:
    # c2p + p2c are added to the merged scores: one [B*H, S, S] bias; the mask is
    # masked_fill(~mask, min) over query and key padding. TorchScript's export: Where(Cast(Not(
    # mask)), min, scores), K^T divided by sqrt(head_dim * 3) computed from sizes, the
    # probabilities' own Shape sizing their merge, and the bias's shape known only through the
    # size rules (GatherElements over expanded, clamped positions; the embeddings' sliced
    # position ids): ONNX shape inference loses it.
    path = exports.get("deberta-v2", "eager", dynamo, None)
    original = onnx.load(str(path))
    optimized, report = optimize(path, DENSE)
    check_structure(original, optimized, layers=2)
    for site in report.sites:
        assert site.replaced and site.masked and not site.causal, site.reason
        assert (site.heads, site.kv_heads, site.head_dim) == (2, 2, 16)
    a, b = sessions(original, optimized)
    for seq in (5, 16, 33):
        x = feeds(a, seq)
        real = x["attention_mask"].astype(bool)  # padded queries see no key: zeros, not the mean
        np.testing.assert_allclose(b.run(None, x)[0][real], a.run(None, x)[0][real], atol=1e-4, rtol=0)
    nodes = [n for n in optimized.graph.node if n.op_type == "SparseAttention"]
    shapes = _runtime_shapes(optimized, [nodes[0].input[3], nodes[0].input[4]], feeds(a, 33))
    assert shapes[nodes[0].input[4]] == (2, 2, 33, 33)  # the bias, per head; the mask [B, 1, S, S]
