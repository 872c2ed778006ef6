"""Every attention family the exporters emit is found, replaced, and stays exact when dense."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import VISION, feeds, sessions

from tfsa_onnx.rewrite import optimize

DENSE = {"defaults": {"threshold": 1.0, "max_density": 1.0, "min_seq_len": 0, "block_size": 16}}

# (family, attention, dynamo, opset, heads, kv heads, causal, batch)
CASES = [
    ("bert", "eager", False, 14, 2, 2, False, 2),
    ("bert", "sdpa", False, 14, 2, 2, False, 2),
    ("bert", "eager", False, 17, 2, 2, False, 2),
    ("bert", "sdpa", False, 17, 2, 2, False, 2),
    ("bert", "eager", True, None, 2, 2, False, 2),
    ("bert", "sdpa", True, None, 2, 2, False, 2),
    ("bert", "eager", True, 23, 2, 2, False, 2),
    ("bert", "sdpa", True, 23, 2, 2, False, 2),  # the standard Attention op, 4-D
    ("vit", "eager", False, 17, 2, 2, False, 2),
    ("vit", "sdpa", True, None, 2, 2, False, 2),
    ("clip-vision", "sdpa", False, 17, 2, 2, False, 2),
    ("clip-vision", "sdpa", True, None, 2, 2, False, 2),
    ("dinov2", "sdpa", False, 17, 2, 2, False, 2),
    ("dinov2", "sdpa", True, None, 2, 2, False, 2),
    # the TorchScript exporter cannot export its position interpolation (bicubic antialiased)
    ("dinov2-registers", "sdpa", True, None, 2, 2, False, 2),
    ("siglip-vision", "eager", False, 17, 2, 2, False, 2),
    ("siglip-vision", "sdpa", True, None, 2, 2, False, 2),
    ("gpt2", "eager", False, 17, 2, 2, True, 2),
    ("gpt2", "sdpa", True, None, 2, 2, True, 2),
    ("llama", "sdpa", False, 17, 4, 2, True, 2),
    ("llama", "eager", True, None, 4, 2, True, 2),
    ("llama", "sdpa", True, None, 4, 2, True, 2),
    # onnxruntime's RotaryEmbedding fails on this export at batch > 1 (original model too).
    ("llama", "sdpa", True, 23, 4, 2, True, 1),
    ("qwen2", "sdpa", True, None, 4, 1, True, 2),
]


def _id(case) -> str:
    family, attn, dynamo, opset = case[:4]
    return f"{family}-{attn}-{'dynamo' if dynamo else 'ts'}-{opset or 'default'}"


def check_structure(
    original: onnx.ModelProto, optimized: onnx.ModelProto, layers: int, checker: bool = True
) -> None:
    """The rules every optimized model keeps (checker, shapes, interface, opsets, no dead code).
    checker=False for graphs whose original the checker rejects already (onnxruntime's contrib
    ops in the default domain, such as SimplifiedLayerNormalization)."""
    if checker:
        onnx.checker.check_model(optimized, full_check=True)
        onnx.shape_inference.infer_shapes(optimized, strict_mode=True)
    ops = [n.op_type for n in optimized.graph.node]
    assert ops.count("SparseAttention") == layers
    assert "Softmax" not in ops
    assert not [n for n in optimized.graph.node if n.op_type in ("Attention", "MultiHeadAttention")]
    for a, b in (
        (original.graph.input, optimized.graph.input),
        (original.graph.output, optimized.graph.output),
    ):
        assert [(v.name, v.type) for v in a] == [(v.name, v.type) for v in b]
    opsets = {o.domain: o.version for o in optimized.opset_import}
    assert opsets.pop("ai.tfsa") == 1
    used = {n.domain for n in original.graph.node}
    before = {o.domain: o.version for o in original.opset_import}
    assert {k: v for k, v in opsets.items() if k in before or k not in used} == before
    used = {i for n in optimized.graph.node for i in n.input} | {o.name for o in optimized.graph.output}
    assert all(any(o in used for o in n.output) for n in optimized.graph.node), "dead node left"
    assert all(t.name in used for t in optimized.graph.initializer), "dead initializer left"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_family_dense_equivalence(exports, case) -> None:
    family, attn, dynamo, opset, heads, kv_heads, causal, batch = case
    path = exports.get(family, attn, dynamo, opset)
    original = onnx.load(str(path))
    optimized, report = optimize(path, DENSE)
    check_structure(original, optimized, layers=2)
    assert [s.layer for s in report.sites] == [0, 1]
    for site in report.sites:
        assert site.replaced, site.reason
        assert (site.heads, site.kv_heads, site.head_dim) == (heads, kv_heads, 16)
        assert site.causal == causal
        if causal:  # the causal triangle is an attribute, not a materialised S x S mask
            assert next(n for n in optimized.graph.node if n.name == site.name).attribute
    a, b = sessions(original, optimized)
    for seq in (5, 16, 33) if family not in VISION else (17,):
        x = feeds(a, seq, batch=batch)
        expected, got = a.run(None, x)[0], b.run(None, x)[0]
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_causal_mask_is_not_materialised(exports) -> None:
    """GPT-2: is_causal=1 and the op's mask (padding only) has no query axis of length S."""
    optimized, _ = optimize(exports.get("gpt2", "sdpa", True), DENSE)
    nodes = [n for n in optimized.graph.node if n.op_type == "SparseAttention"]
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["is_causal"] == 1
    inferred = onnx.shape_inference.infer_shapes(optimized)
    shapes = {v.name: v.type.tensor_type.shape for v in inferred.graph.value_info}
    mask = nodes[0].input[3] if len(nodes[0].input) > 3 else ""
    if mask and mask in shapes:
        dims = [d.dim_value or d.dim_param for d in shapes[mask].dim]
        assert dims[-2] == 1, dims


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("bert", "llama")], ids=_id)
def test_matching_changes_nothing(exports, case) -> None:
    """Rules and the mask analysis only read the graph: nodes are built in the rewrite step."""
    import onnx_ir as ir

    from tfsa_onnx.rewrite import passes
    from tfsa_onnx.rewrite.masks import MaskAnalyzer

    model = ir.load(str(exports.get(*case[:4])))
    passes._infer_shapes(model)
    before = ([id(n) for n in model.graph], sorted(model.graph.initializers))
    analyzer, matched = MaskAnalyzer(model), 0
    for node in list(model.graph):
        for rule in passes._rules():
            if rule.is_anchor(node):
                site = passes._match(node, rule, passes.Report())
                if site is not None and site.match is not None:
                    passes._resolve_mask(site, analyzer)
                    matched += 1
    assert matched == 2
    assert ([id(n) for n in model.graph], sorted(model.graph.initializers)) == before
