"""A key-padding mask reaches the op as [B, 1, 1, Sk], never as the [B, 1, Sq, Sk] the graph
expands it to: the op broadcasts the mask itself, so an Expand under the mask's elementwise ops
is left out (masks.MaskAnalyzer._without_expand). A mask with a real query axis keeps it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import VISION, sessions
from onnx import TensorProto, helper
from test_rewrite_bias import _runtime_shapes
from test_rewrite_families import CASES as FAMILIES
from test_rewrite_families import DENSE, _id, check_structure

from tfsa_onnx.rewrite import optimize

QUERY_AXIS_NOTE = "query axis not provably 1"


MASKED = [c for c in FAMILIES if c[0] not in VISION]


@pytest.mark.parametrize("case", MASKED, ids=_id)
def test_padding_reaches_the_op_as_a_key_mask(exports, case) -> None:
    """Every family with a padding mask (BERT's TorchScript exports, eager and SDPA, opsets 14
    and 17, among them): the op's mask is [B, 1, 1, S] at run time, and no site notes a mask
    with a query axis."""
    family, attn, dynamo, opset, *_, batch = case
    optimized, report = optimize(exports.get(family, attn, dynamo, opset), DENSE)
    assert not any(QUERY_AXIS_NOTE in n for s in report.sites for n in s.notes), report.notes()
    nodes = [n for n in optimized.graph.node if n.op_type == "SparseAttention"]
    masks_in = sorted({n.input[3] for n in nodes if len(n.input) > 3 and n.input[3]})
    assert masks_in or family != "bert"
    if masks_in:  # token ids and mask: [batch, 33] each
        x = {i.name: np.ones((batch, 33), np.int64) for i in optimized.graph.input}
        assert set(_runtime_shapes(optimized, masks_in, x).values()) == {(batch, 1, 1, 33)}


def _attention(mask_nodes: list[onnx.NodeProto], mask_input: onnx.ValueInfoProto) -> onnx.ModelProto:
    """softmax(Q K^T / 4 + m) V over 2 heads, m the output "m" of `mask_nodes`, which compute it
    from the input `mask_input`; "target" is the scores' shape [B, 1, Sq, Sk] for their Expand."""
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, f, [2, 2, "s", 8]) for n in "qkv"] + [mask_input]
    scalars = {"quarter": 0.25, "one": 1.0, "neg": -3.4e38, "zero": 0.0}
    nodes = [
        helper.make_node("Constant", [], [n], value=helper.make_tensor(n, f, [], [v]))
        for n, v in scalars.items()
    ]
    nodes += [
        helper.make_node("Constant", [], ["heads1"], value=helper.make_tensor("heads1", 7, [1], [1])),
        helper.make_node("Shape", ["q"], ["batch"], start=0, end=1),
        helper.make_node("Shape", ["q"], ["sq"], start=2, end=3),
        helper.make_node("Shape", ["k"], ["sk"], start=2, end=3),
        helper.make_node("Concat", ["batch", "heads1", "sq", "sk"], ["target"], axis=0),
        *mask_nodes,
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"]),
        helper.make_node("Mul", ["qk", "quarter"], ["scores"]),
        helper.make_node("Add", ["scores", "m"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"]),
    ]
    out = helper.make_tensor_value_info("y", f, [2, 2, "s", 8])
    graph = helper.make_graph(nodes, "expanded_mask", inputs, [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _padding_model() -> onnx.ModelProto:
    """transformers 4.x's _prepare_4d_attention_mask: pad [B, S] -> [B, 1, 1, S], expanded to
    [B, 1, Sq, Sk], inverted (1 - mask) and filled: Where(Cast(inv, bool), min, inv)."""
    pad = helper.make_tensor_value_info("pad", TensorProto.INT64, [2, "s"])
    nodes = [
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("axes", 7, [2], [1, 2])),
        helper.make_node("Unsqueeze", ["pad", "axes"], ["x"]),
        helper.make_node("Expand", ["x", "target"], ["e"]),
        helper.make_node("Cast", ["e"], ["ef"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "ef"], ["inv"]),
        helper.make_node("Cast", ["inv"], ["hidden"], to=TensorProto.BOOL),
        helper.make_node("Where", ["hidden", "neg", "inv"], ["m"]),
    ]
    return _attention(nodes, pad)


def _query_key_model() -> onnx.ModelProto:
    """A boolean mask per query and key [B, 1, S, S] expanded to [B, H, Sq, Sk]: the heads are
    the op's broadcast, but what it hides depends on the query, so its query axis must stay."""
    seen = helper.make_tensor_value_info("seen", TensorProto.BOOL, [2, 1, "s", "s"])
    nodes = [
        helper.make_node("Constant", [], ["heads"], value=helper.make_tensor("heads", 7, [4], [1, 2, 1, 1])),
        helper.make_node("Mul", ["target", "heads"], ["per_head"]),
        helper.make_node("Expand", ["seen", "per_head"], ["e"]),
        helper.make_node("Not", ["e"], ["hidden"]),
        helper.make_node("Where", ["hidden", "neg", "zero"], ["m"]),
    ]
    return _attention(nodes, seen)


def _reshaped_model() -> onnx.ModelProto:
    """The padding of _padding_model expanded, then reshaped (to its own shape): a Reshape is
    not elementwise, so the Expand under it stays and the report says the mask has Sq rows."""
    pad = helper.make_tensor_value_info("pad", TensorProto.INT64, [2, "s"])
    nodes = [
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("axes", 7, [2], [1, 2])),
        helper.make_node("Unsqueeze", ["pad", "axes"], ["x"]),
        helper.make_node("Expand", ["x", "target"], ["e"]),
        helper.make_node("Reshape", ["e", "target"], ["r"]),
        helper.make_node("Cast", ["r"], ["hidden_int"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "hidden_int"], ["inv"]),
        helper.make_node("Mul", ["inv", "neg"], ["m"]),
    ]
    return _attention(nodes, pad)


def _inputs(model: onnx.ModelProto, seq: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    x = {n: rng.standard_normal((2, 2, seq, 8)).astype(np.float32) for n in "qkv"}
    name = model.graph.input[3].name
    if name == "pad":  # the second row padded
        x[name] = np.ones((2, seq), np.int64)
        x[name][1, max(1, seq * 2 // 3) :] = 0
    else:  # each query sees itself and a random set of keys
        x[name] = (rng.random((2, 1, seq, seq)) < 0.5) | np.eye(seq, dtype=bool)
    return x


@pytest.mark.parametrize(
    "build,rows,note",
    [(_padding_model, 1, False), (_query_key_model, "seq", True), (_reshaped_model, "seq", True)],
    ids=["padding", "query-and-key", "reshaped"],
)
def test_an_expanded_mask_reaches_the_op_unexpanded(build, rows, note) -> None:
    model = build()
    optimized, report = optimize(model, DENSE)
    check_structure(model, optimized, layers=1)
    site = report.sites[0]
    assert site.replaced and site.masked, site.reason
    assert any(QUERY_AXIS_NOTE in n for n in site.notes) == note
    if build is _padding_model:  # the inverted mask feeds the Where twice: rebuilt once
        assert [n.op_type for n in optimized.graph.node].count("Sub") == 1
    node = next(n for n in optimized.graph.node if n.op_type == "SparseAttention")
    a, b = sessions(model, optimized)
    rng = np.random.default_rng(0)
    for seq in (5, 16, 33):
        x = _inputs(model, seq, rng)
        shape = _runtime_shapes(optimized, [node.input[3]], x)[node.input[3]]
        assert shape == (2, 1, seq if rows == "seq" else rows, seq)
        np.testing.assert_allclose(b.run(None, x)[0], a.run(None, x)[0], atol=1e-5, rtol=0)
