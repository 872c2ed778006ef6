"""Fused attention nodes: ONNX Attention (3-D inputs) and onnxruntime's com.microsoft fusions."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from conftest import feeds, sessions
from onnx import TensorProto, helper
from test_rewrite_families import DENSE, check_structure

from tfsa_onnx.rewrite import optimize


def attention_3d_model(causal: int = 0, **extra) -> onnx.ModelProto:
    """x [B, S, 32] -> Q (4 heads) and K, V (2 heads) projections -> Attention(3-D), opset 23."""
    rng = np.random.default_rng(0)
    hidden, hq, hkv, d = 32, 4, 2, 8
    weights = {
        "wq": rng.standard_normal((hidden, hq * d)).astype(np.float32) * 0.3,
        "wk": rng.standard_normal((hidden, hkv * d)).astype(np.float32) * 0.3,
        "wv": rng.standard_normal((hidden, hkv * d)).astype(np.float32) * 0.3,
    }
    inits = [onnx.numpy_helper.from_array(w, n) for n, w in weights.items()]
    nodes = [helper.make_node("MatMul", ["x", f"w{t}"], [t]) for t in "qkv"]
    layer_in = "x"
    for i in range(2):
        names = [f"{t}{i}" for t in "qkv"]
        nodes += [
            helper.make_node("MatMul", [layer_in, f"w{t}"], [n]) for t, n in zip("qkv", names, strict=True)
        ]
        nodes.append(
            helper.make_node(
                "Attention",
                [*names, "mask"],
                [f"y{i}"],
                q_num_heads=hq,
                kv_num_heads=hkv,
                is_causal=causal,
                name=f"layer{i}/Attention",
                **extra,
            )
        )
        layer_in = f"y{i}"
    nodes = nodes[3:]  # the first three were only a template
    graph = helper.make_graph(
        nodes,
        "attention3d",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", 1, "seq", "seq"]),
        ],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["batch", "seq", hq * d])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


@pytest.mark.parametrize("causal,softcap", [(0, 0.0), (1, 0.0), (0, 0.5), (1, 0.5)])
def test_onnx_attention_3d(causal: int, softcap: float) -> None:
    original = attention_3d_model(causal, **({"softcap": softcap} if softcap else {}))
    onnx.checker.check_model(original, full_check=True)
    optimized, report = optimize(original, DENSE)
    check_structure(original, optimized, layers=2)
    assert [(s.family, s.heads, s.kv_heads, s.head_dim, s.causal) for s in report.sites] == [
        ("onnx-attention", 4, 2, 8, bool(causal))
    ] * 2
    ops = [n for n in optimized.graph.node if n.op_type == "SparseAttention"]
    assert {a.f for n in ops for a in n.attribute if a.name == "softcap"} == (
        {np.float32(softcap)} if softcap else set()
    )
    a, b = sessions(original, optimized)
    plain, _ = sessions(attention_3d_model(causal), optimized)
    rng = np.random.default_rng(1)
    for seq in (5, 33):
        mask = np.ones((2, 1, seq, seq), bool)  # onnxruntime wants the query axis in full
        mask[1, ..., seq // 2 :] = False
        x = {"x": rng.standard_normal((2, seq, 32)).astype(np.float32), "mask": mask}
        expected = a.run(None, x)[0]
        np.testing.assert_allclose(b.run(None, x)[0], expected, atol=1e-4, rtol=0)
        if softcap:  # ONNX caps the scores before the mask, as the op does; the cap bites here
            assert np.abs(plain.run(None, x)[0] - expected).max() > 1e-2


@pytest.fixture(scope="module", params=[False, True], ids=["Attention", "MultiHeadAttention"])
def ort_fused(request, exports, tmp_path_factory):
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert")
    options.use_multi_head_attention = request.param
    fused = optimizer.optimize_model(
        str(exports.get("bert", "eager", False, 17)),
        model_type="bert",
        num_heads=2,
        hidden_size=32,
        optimization_options=options,
        opt_level=0,
    )
    op = "MultiHeadAttention" if request.param else "Attention"
    assert sum(n.op_type == op for n in fused.model.graph.node) == 2
    return fused.model


def test_ort_contrib_attention(ort_fused) -> None:
    optimized, report = optimize(ort_fused, DENSE)
    check_structure(ort_fused, optimized, layers=2)
    assert all(s.replaced and (s.heads, s.kv_heads, s.head_dim) == (2, 2, 16) for s in report.sites)
    assert all(s.masked for s in report.sites)
    a, b = sessions(ort_fused, optimized)
    for seq in (5, 16, 33):
        x = feeds(a, seq)
        np.testing.assert_allclose(b.run(None, x)[0], a.run(None, x)[0], atol=1e-4, rtol=0)


@pytest.fixture(
    scope="module",
    params=[("bert", 1), ("bert", 2), ("llama", 1), ("llama", 2)],
    ids=lambda p: f"{p[0]}-O{p[1]}",
)
def ort_optimized(request, exports):
    """What `optimum-cli export onnx --optimize O1/O2` runs: onnxruntime's transformers optimizer
    without EmbedLayerNormalization (BERT's mask becomes mask_index = ReduceSum(mask)), after
    onnxruntime's own graph optimizations, which strip the shapes past its contrib ops."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    family, level = request.param
    model_type, heads, hidden, attn = (
        ("bert", 2, 32, "eager") if family == "bert" else ("gpt2", 4, 64, "sdpa")
    )
    options = FusionOptions(model_type)
    options.enable_embed_layer_norm = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = optimizer.optimize_model(
            str(exports.get(family, attn, False, 17)),
            model_type=model_type,
            num_heads=heads,
            hidden_size=hidden,
            optimization_options=options,
            opt_level=level,
        )
    assert any(n.domain == "com.microsoft" for n in fused.model.graph.node)
    # onnxruntime's optimizer imports every domain registered in the process, ours included
    imports = [o for o in fused.model.opset_import if o.domain != "ai.tfsa"]
    del fused.model.opset_import[:]
    fused.model.opset_import.extend(imports)
    return family, fused.model


def test_ort_optimized_graphs(ort_optimized) -> None:
    """Every attention of an onnxruntime-optimized graph is replaced and exact with padding."""
    family, original = ort_optimized
    optimized, report = optimize(original, DENSE)
    check_structure(original, optimized, layers=2, checker=family == "bert")
    assert all(s.replaced and s.masked for s in report.sites), report.table()
    assert all(s.causal == (family == "llama") for s in report.sites)
    a, b = sessions(original, optimized)
    for seq in (5, 16, 33):
        x = feeds(a, seq)
        np.testing.assert_allclose(b.run(None, x)[0], a.run(None, x)[0], atol=1e-4, rtol=0)
