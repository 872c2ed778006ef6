"""Mask terms are dropped only when proven for every length (tfsa_onnx/rewrite/mask_proof.py).

A sliding window longer than a short input looks causal there: these tests run real exports at
lengths beyond every window, and check that evaluation at a few lengths never decides alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import feeds, sessions
from onnx import TensorProto, helper
from test_rewrite_bias import _runtime_shapes

from tfsa_onnx.rewrite import masks, optimize
from tfsa_onnx.rewrite.common import Builder
from tfsa_onnx.rewrite.mask_proof import Dim, MaskAlgebra, Term, Unknown, classify, mask_constants
from tfsa_onnx.rewrite.passes import _infer_shapes

DENSE = {
    "defaults": {
        "threshold": 1.0,
        "max_density": 1.0,
        "min_seq_len": 0,
        "block_size": 64,
        "global_tokens": 0,
        "local_window": 0,
    }
}

# (family, dynamo, window per layer: None = causal without a window)
WINDOWED = [
    ("mistral-window", True, [300, 300]),
    ("mistral-window", False, [300, 300]),
    ("qwen2-window", True, [300, 300]),
    ("qwen2-window", False, [300, 300]),
    ("gemma3", True, [512] * 5 + [None]),
    ("gemma3", False, [512] * 5 + [None]),  # TorchScript slices the whole mask per layer: proven too
]


@pytest.mark.parametrize("family,dynamo,windows", WINDOWED, ids=lambda c: str(c))
def test_sliding_windows_stay_exact_beyond_the_window(exports, family, dynamo, windows) -> None:
    path = exports.get(family, "sdpa", dynamo)
    original = onnx.load(str(path))
    optimized, report = optimize(path, DENSE)
    assert all(s.replaced for s in report.sites)
    assert [s.window for s in report.sites] == windows
    assert all(s.causal for s in report.sites)
    nodes = {n.name: n for n in optimized.graph.node if n.op_type == "SparseAttention"}
    for site in report.sites:  # the band is the op's sliding_window, not an S x S mask
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[site.name].attribute}
        assert attrs.get("sliding_window", 0) == (site.window or 0)
        assert attrs["is_causal"] == 1
    a, b = sessions(original, optimized)
    # the padding is all that is left of the mask: [B, 1, 1, S], never S x S
    masks_in = sorted({n.input[3] for n in nodes.values()})
    assert set(_runtime_shapes(optimized, masks_in, feeds(a, 33)).values()) == {(2, 1, 1, 33)}
    for seq in (64, 600, 1100):
        x = feeds(a, seq)
        # Padded queries past the window may attend to no key: the op gives them zeros where
        # the export's finite -3.4e38 mask averages every value. Real tokens must be equal.
        real = x["attention_mask"].astype(bool)
        np.testing.assert_allclose(b.run(None, x)[0][real], a.run(None, x)[0][real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_modernbert_local_layers_get_their_two_sided_band(exports, dynamo) -> None:
    """ModernBERT's local layers attend |i - j| <= 8 (local_attention 16): proven for every
    length, the band is the op's sliding_window 9 and window_ahead 8, no [B, 1, S, S] mask is
    left (the key padding alone), and the outputs stay exact past the window on both sides."""
    path = exports.get("modernbert", "sdpa", dynamo)
    original = onnx.load(str(path))
    optimized, report = optimize(path, DENSE)
    assert [s.replaced for s in report.sites] == [True] * 3
    assert not [n for n in optimized.graph.node if n.op_type == "Softmax"]
    assert not any(s.notes for s in report.sites)  # nothing of the mask is kept unproven
    assert [(s.causal, s.window, s.window_ahead) for s in report.sites] == [(False, None, None)] + [
        (False, 9, 8)
    ] * 2
    nodes = [n for n in optimized.graph.node if n.op_type == "SparseAttention"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert [(a["is_causal"], a.get("sliding_window"), a.get("window_ahead")) for a in attrs] == [
        (0, None, None),
        (0, 9, 8),
        (0, 9, 8),
    ]
    a, b = sessions(original, optimized)
    masks_in = sorted({n.input[3] for n in nodes})
    assert set(_runtime_shapes(optimized, masks_in, feeds(a, 17)).values()) == {(2, 1, 1, 17)}
    for seq in (5, 17, 40):  # past the window on both sides
        x = feeds(a, seq)
        # Padded queries past every real key's band attend to nothing: zeros from the op where
        # the export's finite minimum averages every value. Real tokens must be equal.
        real = x["attention_mask"].astype(bool)
        np.testing.assert_allclose(b.run(None, x)[0][real], a.run(None, x)[0][real], atol=1e-4, rtol=0)


# ---------------------------------------------------------------- synthetic mask graphs


def _mask_model(build) -> tuple[ir.Model, ir.Value]:
    """A graph whose output 'mask' is built from i (query index) and j (key index) of a
    length-`seq` input: build(nodes) appends nodes and returns the name of the mask."""
    nodes = [
        helper.make_node("Shape", ["ids"], ["len1"], start=1, end=2),
        helper.make_node("Squeeze", ["len1"], ["n"]),
        helper.make_node("Range", ["zero", "n", "one"], ["r"]),
        helper.make_node("Unsqueeze", ["r", "ax1"], ["i"]),  # [n, 1]
        helper.make_node("Unsqueeze", ["r", "ax0"], ["j"]),  # [1, n]
    ]
    out = build(nodes)
    nodes.append(helper.make_node("Identity", [out], ["mask"]))
    inits = [
        helper.make_tensor("zero", TensorProto.INT64, [], [0]),
        helper.make_tensor("one", TensorProto.INT64, [], [1]),
        helper.make_tensor("ax0", TensorProto.INT64, [1], [0]),
        helper.make_tensor("ax1", TensorProto.INT64, [1], [1]),
    ]
    graph = helper.make_graph(
        nodes,
        "masks",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("mask", TensorProto.BOOL, None)],
        initializer=inits,
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    _infer_shapes(model)
    return model, model.graph.outputs[0].producer().inputs[0]


def _const(nodes, name, value):
    nodes.append(helper.make_node("Constant", [], [name], value=helper.make_tensor(name, 7, [], [value])))
    return name


def _ops(nodes, *lines: str) -> str:
    """Appends a node per line "OpType input... output"; returns the last output."""
    for line in lines:
        op, *inputs, out = line.split()
        nodes.append(helper.make_node(op, inputs, [out]))
    return out


def causal(nodes):
    return _ops(nodes, "LessOrEqual j i m")


def window(size):
    def build(nodes):
        _const(nodes, "w", size)
        return _ops(
            nodes, "Sub i w lo", "Greater j lo in_window", "LessOrEqual j i tri", "And in_window tri m"
        )

    return build


def causal_until(length):
    """Causal for inputs shorter than `length`, all true from then on."""

    def build(nodes):
        _const(nodes, "limit", length)
        return _ops(nodes, "LessOrEqual j i tri", "Greater n limit long", "Or tri long m")

    return build


def not_strictly_above(nodes):
    """Not(j > i): causal written another way."""
    return _ops(nodes, "Greater j i above", "Not above m")


def shifted(nodes):
    """j <= i + 1: one key past the diagonal."""
    _const(nodes, "k1", 1)
    return _ops(nodes, "Add i k1 i1", "LessOrEqual j i1 m")


def strictly_past(nodes):
    """j < i: no query sees itself (no window_ahead says that)."""
    return _ops(nodes, "Less j i m")


def bidirectional(half, op="LessOrEqual", order="i j"):
    """|i - j| <= half (ModernBERT's local layers: half = local_attention // 2), or another
    comparison of the distance with the constant."""

    def build(nodes):
        _const(nodes, "half", half)
        return _ops(nodes, f"Sub {order} d", "Abs d dist", f"{op} dist half m")

    return build


def open_window(size):
    """j > i - size, no causality: the past cut, the future seen."""

    def build(nodes):
        _const(nodes, "w", size)
        return _ops(nodes, "Sub i w lo", "Greater j lo m")

    return build


def all_true(nodes):
    return _ops(nodes, "GreaterOrEqual j zero m")


@pytest.mark.parametrize(
    "build,expected",
    [
        (causal, Term("causal")),
        (not_strictly_above, Term("causal")),
        (all_true, Term("all")),
        (window(40), Term("band", 40, 0)),
        (window(512), Term("band", 512, 0)),
        (window(1), Term("band", 1, 0)),
        (shifted, Term("band", None, 1)),
        (strictly_past, Term("other")),
        (causal_until(100), Term("other")),  # depends on the length itself
        (bidirectional(8), Term("band", 9, 8)),  # local_attention 16
        (bidirectional(7, order="j i"), Term("band", 8, 7)),  # local_attention 15 (odd)
        (bidirectional(0), Term("band", 1, 0)),  # each query itself: a band of one key
        (bidirectional(5, op="Less"), Term("band", 5, 4)),
        (bidirectional(3, op="Greater"), Term("other")),  # outside the band: two pieces
        (bidirectional(3, op="Equal"), None),  # not taken apart: unproven, so kept
        (open_window(6), Term("band", 6, None)),
    ],
    ids=[
        "causal",
        "not-above",
        "all-true",
        "window40",
        "window512",
        "window1",
        "shifted",
        "strictly-past",
        "causal-until-100",
        "abs-le-8",
        "abs-le-7",
        "abs-le-0",
        "abs-lt-5",
        "abs-gt-3",
        "abs-eq-3",
        "open-window-6",
    ],
)
def test_classify_synthetic_masks(build, expected) -> None:
    model, mask = _mask_model(build)
    assert classify(MaskAlgebra(), mask, additive=False) == expected


@pytest.mark.parametrize("build", [window(40), causal_until(100), strictly_past])
def test_terms_that_look_causal_at_the_probe_lengths_are_kept(build) -> None:
    """Each of these is the lower triangle at lengths 1..33 (or differs only past them):
    the analysis keeps it in the mask and does not claim causality."""
    model, mask = _mask_model(build)
    result = masks.MaskAnalyzer(model).split(mask, additive=False, square=True)
    if build is strictly_past:
        assert result.build(_builder(model)) is mask and not result.causal
        return
    probe = masks.MaskProber(model).evaluate(mask)
    assert probe is not None and masks._is_lower_triangle(probe, additive=False)
    if result.window is not None:  # proven a band: is_causal and sliding_window say it exactly
        assert result.window == 40 and result.causal and result.kept is None
    else:
        assert result.build(_builder(model)) is mask and not result.causal


def test_no_term_is_dropped_on_probe_evidence_alone(monkeypatch) -> None:
    """With the proof unavailable, a mask that every probe length shows as causal is kept."""
    model, mask = _mask_model(causal)
    monkeypatch.setattr(masks, "classify", lambda *args: None)
    result = masks.MaskAnalyzer(model).split(mask, additive=False, square=True)
    assert result.build(_builder(model)) is mask and not result.causal
    assert result.notes  # and the report says so


def test_a_proof_the_probe_contradicts_is_not_used(monkeypatch) -> None:
    model, mask = _mask_model(window(3))  # not causal at 5, 16, 33 tokens
    monkeypatch.setattr(masks, "classify", lambda *args: Term("causal"))
    result = masks.MaskAnalyzer(model).split(mask, additive=False, square=True)
    assert result.build(_builder(model)) is mask and not result.causal
    assert any("contradicts" in n for n in result.notes)


@pytest.mark.parametrize("end,whole", [("len1", True), ("five", False)])
def test_a_slice_that_keeps_every_key_is_looked_through(end, whole) -> None:
    """optimum's with-past export slices its mask to the key length (mask[..., :key_length]):
    a slice proven to keep every element goes the way of Cast and Expand; one that may cut the
    mask (here to 5 keys) keeps the mask as it is."""

    def build(nodes):
        nodes.append(
            helper.make_node("Constant", [], ["five"], value=helper.make_tensor("five", 7, [1], [5]))
        )
        _ops(nodes, "LessOrEqual j i tri")
        nodes.append(helper.make_node("Slice", ["tri", "ax0", end, "ax1"], ["m"]))
        return "m"

    model, mask = _mask_model(build)
    result = masks.MaskAnalyzer(model).split(mask, additive=False, square=True)
    assert result.causal == whole
    assert (result.kept is None) == whole


def test_causal_needs_equal_query_and_key_lengths() -> None:
    """j <= i on a [Sq, Sk] mask whose lengths differ is not the op's is_causal (j <= i + Sk - Sq)."""

    def build(nodes):
        nodes.append(helper.make_node("Shape", ["ids"], ["len0"], start=0, end=1))
        return _ops(
            nodes, "Squeeze len0 b", "Range zero b one rb", "Unsqueeze rb ax1 ib", "LessOrEqual j ib m"
        )

    model, mask = _mask_model(build)
    assert classify(MaskAlgebra(), mask, additive=False) == Term("other")


def test_mask_constants_find_the_window() -> None:
    model, mask = _mask_model(window(300))
    assert max(mask_constants(mask)) == 300


def test_dim_algebra() -> None:
    s = Dim.symbol("s")
    assert (s + 3) - s == Dim(3)
    assert (s - 1).scaled(2) == Dim(-2, (("s", 2),))
    assert s + 0 == s and (s - s).is_const


def _builder(model: ir.Model) -> Builder:
    return Builder(model.graph, model.graph.outputs[0].producer(), "test")


def test_validate_checks_a_length_past_the_window(exports, tmp_path, monkeypatch) -> None:
    """validate's generated inputs include a length past the 300-token window: a model that lost
    its window (as a probe-only analysis would drop it) fails there, the exact one passes."""
    from click.testing import CliRunner

    from tfsa_onnx.cli import main

    path = exports.get("mistral-window", "sdpa", True)
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(optimize(path, DENSE)[0], str(good))
    with monkeypatch.context() as m:
        m.setattr(masks, "classify", lambda *args: Term("causal"))  # the window looks causal at 33
        onnx.save(optimize(path, DENSE)[0], str(bad))
    args = ["validate", str(path), "--seq-len", "256", "--samples", "1", "--atol", "1e-3"]
    passed = CliRunner().invoke(main, [*args[:2], str(good), *args[2:]])
    assert passed.exit_code == 0, passed.output
    assert "320 tokens (past the masks' largest constant, 300)" in passed.output
    failed = CliRunner().invoke(main, [*args[:2], str(bad), *args[2:]])
    assert failed.exit_code == 1
    assert "FAIL at 320 tokens" in failed.output and "FAIL at 64 tokens" not in failed.output


def test_sizes_through_a_split_axis_a_matmul_and_a_square_root() -> None:
    # DeBERTa's TorchScript scale: sqrt(head_dim * 3), head_dim the -1 of [B, S, 32] -> [B, S, 2, -1];
    # and a batched MatMul's shape from its inputs' shapes.
    mk = helper.make_node
    nodes = [
        mk("Reshape", ["x", "heads"], ["x4"]),
        mk("Shape", ["x4"], ["s"]),
        mk("Gather", ["s", "three"], ["d"]),
        mk("Cast", ["d"], ["df"], to=TensorProto.FLOAT),
        mk("Mul", ["df", "factor"], ["d3"]),
        mk("Sqrt", ["d3"], ["scale"]),
        mk("Transpose", ["x4"], ["xt"], perm=[0, 2, 1, 3]),
        mk("Transpose", ["x4"], ["xtt"], perm=[0, 2, 3, 1]),
        mk("MatMul", ["xt", "xtt"], ["scores"]),
    ]
    inits = [
        helper.make_tensor("heads", TensorProto.INT64, [4], [0, 0, 2, -1]),
        helper.make_tensor("three", TensorProto.INT64, [], [3]),
        helper.make_tensor("factor", TensorProto.FLOAT, [], [3.0]),
    ]
    graph = helper.make_graph(
        nodes,
        "sizes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 32])],
        [
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, None),
        ],
        initializer=inits,
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    values = {v.name: v for n in model.graph for v in n.outputs}
    for v in values.values():
        v.shape = None  # as the TorchScript export leaves them: the algebra alone decides
    algebra = MaskAlgebra()
    (scale,) = algebra.eval(values["scale"]).values.reshape(-1)
    assert scale.is_const and scale.const == pytest.approx(np.sqrt(48.0))
    b, s = Dim.symbol("b"), Dim.symbol("s")
    assert algebra.shape_of(values["scores"]) == (b, Dim(2), s, s)


def _shapeless(nodes, inputs, outputs, inits) -> dict[str, ir.Value]:
    """The graph's values by name, with every inferred shape removed (the size rules alone decide)."""
    graph = helper.make_graph(nodes, "sizes", inputs, outputs, initializer=inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    values = {v.name: v for n in model.graph for v in n.outputs}
    for v in values.values():
        v.shape = None
    return values


def test_sizes_through_sliced_positions_and_gathered_relative_positions() -> None:
    # DeBERTa's TorchScript export: position ids [1, 10][:, :seq] embedded and added to the
    # tokens' embeddings ([1, min(seq, 10)] broadcasts against seq only as seq: the sum is
    # [b, seq, 4] wherever it runs); c2p-style GatherElements over a clamped [1, seq, seq]
    # index expanded to [2 * b, seq, seq], repeated heads (Tile by b) and B*H split by H.
    mk, i64, f = helper.make_node, TensorProto.INT64, TensorProto.FLOAT
    nodes = [
        mk("Shape", ["ids"], ["len"], start=1, end=2),
        mk("Slice", ["positions", "zero1", "len", "one1"], ["pos"]),
        mk("Gather", ["table", "pos"], ["pos_emb"]),
        mk("Gather", ["table", "ids"], ["tok_emb"]),
        mk("Add", ["tok_emb", "pos_emb"], ["emb"]),
        mk("LayerNormalization", ["emb", "gamma", "beta"], ["hidden"], axis=-1),
        mk("Shape", ["ids"], ["b1"], start=0, end=1),
        mk("Mul", ["b1", "two"], ["bh"]),
        mk("Unsqueeze", ["hidden", "zero1"], ["h4"]),  # [1, b, seq, 4]
        mk("Shape", ["h4"], ["h4_shape"]),
        mk("Slice", ["h4_shape", "two1", "three1"], ["s1"]),
        mk("Concat", ["bh", "s1", "s1"], ["target"], axis=0),
        mk("Unsqueeze", ["rel", "zero1"], ["rel3"]),  # [1, seq, seq] from a [seq, seq] input
        mk("Clip", ["rel3", "lo", "hi"], ["clamped"]),
        # torch's expand: Where(Equal(shape, ConstantOfShape(3) * -1), ConstantOfShape(3), shape),
        # decided by the sizes' signs (2 * b, seq are never -1)
        mk("ConstantOfShape", ["three1"], ["ones"], value=helper.make_tensor("v", i64, [1], [1])),
        mk("Mul", ["ones", "minus1"], ["minus_ones"]),
        mk("Equal", ["target", "minus_ones"], ["keep"]),
        mk("Where", ["keep", "ones", "target"], ["expand_to"]),
        mk("Expand", ["clamped", "expand_to"], ["index"]),
        mk("Concat", ["b1", "one1", "one1"], ["repeats"], axis=0),
        mk("Tile", ["head_pos", "repeats"], ["pos_k"]),  # [2, 6, 4] -> [2 * b, 6, 4]
        mk("GatherElements", ["pos_k", "index"], ["c2p"], axis=-1),
        mk("Concat", ["minus1", "two", "s1", "s1"], ["split"], axis=0),
        mk("Reshape", ["c2p", "split"], ["c2p4"]),
        mk("Shape", ["other"], ["len_other"], start=1, end=2),
        mk("Slice", ["positions", "zero1", "len_other", "one1"], ["pos_other"]),
        mk("Gather", ["table", "pos_other"], ["other_emb"]),
        mk("Add", ["tok_emb", "other_emb"], ["unproven"]),
    ]
    inits = [
        helper.make_tensor("positions", i64, [1, 10], list(range(10))),
        helper.make_tensor("table", f, [10, 4], [0.0] * 40),
        helper.make_tensor("gamma", f, [4], [1.0] * 4),
        helper.make_tensor("beta", f, [4], [0.0] * 4),
        helper.make_tensor("head_pos", f, [2, 6, 4], [0.0] * 48),
        helper.make_tensor("minus1", i64, [1], [-1]),
        helper.make_tensor("lo", i64, [], [0]),
        helper.make_tensor("hi", i64, [], [5]),
        helper.make_tensor("two", i64, [1], [2]),
        *(helper.make_tensor(f"{n}1", i64, [1], [v]) for v, n in enumerate(("zero", "one", "two", "three"))),
    ]
    inputs = [
        helper.make_tensor_value_info("ids", i64, ["b", "seq"]),
        helper.make_tensor_value_info("rel", i64, ["seq", "seq"]),
        helper.make_tensor_value_info("other", i64, ["b", "n"]),
    ]
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("hidden", "c2p4", "unproven")]
    values = _shapeless(nodes, inputs, outputs, inits)
    algebra = MaskAlgebra()
    b, seq = Dim.symbol("b"), Dim.symbol("seq")
    assert algebra.shape_of(values["hidden"]) == (b, seq, Dim(4))
    assert algebra.shape_of(values["c2p"]) == (b.scaled(2), seq, seq)
    assert algebra.shape_of(values["c2p4"]) == (b, Dim(2), seq, seq)
    assert algebra.shape_of(values["pos_k"]) == (b.scaled(2), Dim(6), Dim(4))
    # [:n] of 10 positions, n another input's length: the sum's length is not proven
    with pytest.raises(Unknown):
        algebra.shape_of(values["unproven"])


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_shape_proofs_visit_each_value_once(exports, dynamo, monkeypatch):
    """A residual stream reaches every earlier layer along many paths: the size algebra answers
    each value's shape once (30-layer SmolLM2 took minutes and 13 GB when it recursed per path)."""
    from test_rewrite_families import DENSE

    from tfsa_onnx.rewrite import mask_proof

    calls: list[tuple[int, int]] = []
    inner = mask_proof.MaskAlgebra._shape_of

    def counted(self, value):
        calls.append((id(self), id(value)))
        return inner(self, value)

    monkeypatch.setattr(mask_proof.MaskAlgebra, "_shape_of", counted)
    optimize(onnx.load(str(exports.get("gemma3", "eager", dynamo=dynamo))), DENSE)
    assert calls and len(set(calls)) == len(calls), f"{len(calls) - len(set(calls))} repeated of {len(calls)}"
