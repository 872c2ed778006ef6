"""Gemma 2's logit softcapping (c * tanh(scores / c) before the mask): the rewrite proves the
cap from the Tanh between the QK MatMul and the mask, and the op's softcap attribute carries
it; sliding and global layers alike, both exporters."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import feeds, sessions
from test_rewrite_bias import _runtime_shapes
from test_rewrite_families import check_structure
from test_rewrite_masks import DENSE

from tfsa_onnx.rewrite import optimize


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_gemma2_softcap_is_the_ops_attribute_and_exact(exports, dynamo) -> None:
    path = exports.get("gemma2", "eager", dynamo)  # transformers caps the scores in eager only
    original = onnx.load(str(path))
    optimized, report = optimize(path, DENSE)
    assert [s.replaced for s in report.sites] == [True, True], [s.reason for s in report.sites]
    check_structure(original, optimized, 2)
    assert "Tanh" not in [n.op_type for n in optimized.graph.node]
    assert [s.window for s in report.sites] == [300, None]  # sliding, then global
    assert all(s.causal for s in report.sites)
    nodes = [n for n in optimized.graph.node if n.op_type == "SparseAttention"]
    for node in nodes:
        attrs = _attributes(node)
        assert attrs["softcap"] == pytest.approx(0.05) and attrs["is_causal"] == 1
        assert attrs["scale"] == pytest.approx(256**-0.5)  # query_pre_attn_scalar 256
    # the padding reaches the op as a [B, 1, 1, S] key mask: no S x S mask
    x = feeds(sessions(original, optimized)[0], 33)
    shapes = _runtime_shapes(optimized, [n.input[3] for n in nodes], x)
    assert set(shapes.values()) == {(2, 1, 1, 33)}

    uncapped = onnx.ModelProto()
    uncapped.CopyFrom(optimized)
    for node in uncapped.graph.node:
        if node.op_type == "SparseAttention":
            for a in node.attribute:
                if a.name == "softcap":
                    a.f = 0.0
    a, b = sessions(original, optimized)
    _, c = sessions(original, uncapped)
    for seq in (64, 600, 1100):  # past the 300-token window
        x = feeds(a, seq)
        real = x["attention_mask"].astype(bool)  # padded rows past the window: zeros (README)
        expected = a.run(None, x)[0][real]
        np.testing.assert_allclose(b.run(None, x)[0][real], expected, atol=1e-4, rtol=0)
        assert np.abs(c.run(None, x)[0][real] - expected).max() > 1e-3, "the cap should matter"


def _capped_tiny(chain: list[onnx.NodeProto], caps: dict[str, float]) -> onnx.ModelProto:
    """tiny_attention's model with `chain` from scores0 (QK) to `scores` (the Softmax input)."""
    from tiny_attention import _common_nodes, _model, _tail_nodes

    mk = onnx.helper.make_node
    attention = [
        mk("Transpose", ["k1"], ["kt"], perm=[0, 2, 3, 1]),
        mk("MatMul", ["q", "kt"], ["scores0"]),
        *chain,
        mk("Softmax", ["scores"], ["probs"], axis=-1),
        mk("MatMul", ["probs", "v"], ["ctx"]),
    ]
    model = _model(_common_nodes() + attention + _tail_nodes(), 0, "tiny_capped")
    model.opset_import.pop()
    model.graph.initializer.extend(
        onnx.numpy_helper.from_array(np.array(v, np.float32), k) for k, v in caps.items()
    )
    return model


def test_a_hand_made_softcap_is_exact_and_terms_inside_the_tanh_are_refused() -> None:
    from tiny_attention import tiny_feeds

    mk = onnx.helper.make_node
    capped = _capped_tiny(
        [
            mk("Mul", ["scores0", "scale"], ["s1"]),
            mk("Div", ["s1", "cap"], ["s2"]),
            mk("Tanh", ["s2"], ["s3"]),
            mk("Mul", ["cap", "s3"], ["s4"]),
            mk("Add", ["bias", "s4"], ["scores"]),
        ],
        {"cap": 1.5},
    )
    optimized, report = optimize(capped, DENSE)
    assert report.sites[0].replaced, report.sites[0].reason
    (node,) = [n for n in optimized.graph.node if n.op_type == "SparseAttention"]
    assert _attributes(node)["softcap"] == pytest.approx(1.5)
    a, b = sessions(capped, optimized)
    x = tiny_feeds(1, 40)[0]
    x["attention_mask"][0, 30:] = 0
    np.testing.assert_allclose(b.run(None, x)[1], a.run(None, x)[1], atol=1e-4, rtol=0)

    # the mask inside the Tanh (capped with the scores), and a Tanh scaled by a negative
    inside = [
        mk("Mul", ["scores0", "scale"], ["s1"]),
        mk("Add", ["s1", "bias"], ["s2"]),
        mk("Tanh", ["s2"], ["s3"]),
        mk("Mul", ["s3", "cap"], ["scores"]),
    ]
    negative = [mk("Tanh", ["scores0"], ["s3"]), mk("Mul", ["s3", "cap"], ["scores"])]
    for chain, cap, words in ((inside, 1.5, "inside the softcap's Tanh"), (negative, -2.0, "not a softcap")):
        _, report = optimize(_capped_tiny(chain, {"cap": cap}), DENSE)
        assert not report.sites[0].replaced and words in report.sites[0].reason, report.sites[0].reason
