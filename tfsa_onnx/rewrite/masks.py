"""Attention masks: find the causal part of a mask and replace it by is_causal.

A mask term that does not depend on any input's values (only on shapes and constants) is
dropped when `mask_proof` proves it all-true, the lower triangle `key j <= query i` (the op
then gets is_causal=1), or a band `i - W < j <= i + A` (sliding_window W, and is_causal for
A = 0 or window_ahead A), at every length; an evaluation at a few lengths must agree, but never
decides alone (a 512-key sliding window looks causal at 33 tokens). What is left (a padding
mask, usually [B,1,1,S], and any window or unproven term) is passed as the op's mask, without
the Expands under its elementwise ops: the op broadcasts it, so an expanded key mask reaches it
as [B,1,1,S], and a mask with a query axis says so in the site's notes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from tfsa_onnx.rewrite.common import NEG_LIMIT, Builder, const_scalar, producer, strip_expand
from tfsa_onnx.rewrite.mask_proof import ONE, MaskAlgebra, Term, Unknown, classify, mask_constants

PROBE_LENGTHS = (1, 2, 5, 16, 33)
_SHAPE_OF = {"Shape", "Size"}
# Ops whose output shape follows from their inputs' shapes alone.
_SHAPE_FROM_SHAPES = {
    "Cast",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Equal",
    "Less",
    "LessOrEqual",
    "Greater",
    "GreaterOrEqual",
    "And",
    "Or",
    "Not",
    "Xor",
    "Where",
    "Neg",
    "Abs",
    "Sqrt",
    "Erf",
    "Exp",
    "Identity",
    "Transpose",
    "Gather",
    "GatherElements",
    "GatherND",
    "MatMul",
    "Gemm",
    "Softmax",
    "LayerNormalization",
    "Flatten",
    "Relu",
    "Tanh",
    "Sigmoid",
    "Gelu",
    "Max",
    "Min",
    "IsNaN",
    "Concat",
    "CumSum",  # position ids counted from the tokens (MPNet, RoBERTa): the shape of its input
    "Constant",  # no inputs: its shape is its own
}
# Ops whose output shape follows from input 0's shape and the other inputs' values.
_SHAPE_FROM_VALUES = {
    "Reshape",
    "Expand",
    "Slice",
    "Unsqueeze",
    "Squeeze",
    "Tile",
    "Pad",
    "Split",
    "ConstantOfShape",
    "Range",
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
}
_MAX_ELEMENTWISE_DEPTH = 32  # a mask's own arithmetic is a few ops deep
# Ops whose output element at each index is computed from their inputs' elements at that index
# (numpy broadcasting): over Expand(X) they give what the same ops over X give once broadcast.
_ELEMENTWISE = {
    "Cast",
    "Not",
    "Neg",
    "Where",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "And",
    "Or",
    "Xor",
    "Equal",
    "Less",
    "LessOrEqual",
    "Greater",
    "GreaterOrEqual",
    "Min",
    "Max",
}


def _value_independent(value: ir.Value, limit: int = 600) -> list[ir.Node] | None:
    """Nodes computing `value` if it depends on graph inputs only through their shapes."""
    nodes: dict[int, ir.Node] = {}
    seen: set[tuple[int, bool]] = set()
    stack = [(value, False)]  # (value, only its shape matters)
    while stack:
        v, shape_only = stack.pop()
        if (id(v), shape_only) in seen:
            continue
        seen.add((id(v), shape_only))
        if v.is_graph_input():
            if shape_only:
                continue
            return None
        node = v.producer()
        if node is None:
            continue  # an initializer
        if len(nodes) > limit or node.domain not in ("", "ai.onnx") or _has_subgraph(node):
            return None
        nodes[id(node)] = node
        inputs = [i for i in node.inputs if i is not None]
        if node.op_type in _SHAPE_OF:
            stack.append((inputs[0], True))
        elif not shape_only:
            stack.extend((i, False) for i in inputs)
        elif node.op_type in _SHAPE_FROM_SHAPES:
            stack.extend((i, True) for i in inputs)
        elif node.op_type in _SHAPE_FROM_VALUES and inputs:
            stack.append((inputs[0], True))
            stack.extend((i, False) for i in inputs[1:])
        else:
            return None
    return list(nodes.values())


class MaskProber:
    """Evaluates value-independent subgraphs of one model with onnxruntime."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.cache: dict[int, list[np.ndarray] | None] = {}

    def evaluate(self, value: ir.Value) -> list[np.ndarray] | None:
        """`value` at each probe length, or None when it depends on input values (or fails)."""
        if id(value) in self.cache:
            return self.cache[id(value)]
        result = None
        nodes = _value_independent(value)
        if nodes is not None:
            try:
                result = self._run(nodes, value)
            except Exception:  # noqa: BLE001 - a subgraph ORT cannot run is simply not proven causal
                result = None
        self.cache[id(value)] = result
        return result

    def _run(self, nodes: list[ir.Node], value: ir.Value) -> list[np.ndarray]:
        from tfsa_onnx.runtime import make_session

        graph = self.model.graph
        order = {id(n): i for i, n in enumerate(graph)}
        nodes.sort(key=lambda n: order.get(id(n), 0))
        used_inputs = [
            v for v in graph.inputs if any(u in {id(n) for n in nodes} for u in (id(c) for c, _ in v.uses()))
        ]
        inits = []
        for n in nodes:
            for i in n.inputs:
                if i is not None and i.is_initializer() and i.const_value is not None:
                    inits.append(ir.serde.serialize_tensor(i.const_value))
                    inits[-1].name = i.name
        proto_nodes = [ir.serde.serialize_node(n) for n in nodes]
        inputs = [ir.serde.serialize_value(v) for v in used_inputs]
        out = onnx.helper.make_tensor_value_info(value.name, int(value.dtype or 0), None)
        g = onnx.helper.make_graph(proto_nodes, "probe", inputs, [out], initializer=list(_dedupe(inits)))
        opsets = [onnx.helper.make_opsetid(d, v) for d, v in self.model.opset_imports.items()]
        proto = onnx.helper.make_model(g, opset_imports=opsets, ir_version=self.model.ir_version)
        session = make_session(proto)
        results = []
        for n in PROBE_LENGTHS:
            feeds = {v.name: _probe_input(v, n) for v in used_inputs}
            results.append(session.run([value.name], feeds)[0])
        return results


def _dedupe(tensors: list[onnx.TensorProto]):
    seen = set()
    for t in tensors:
        if t.name not in seen:
            seen.add(t.name)
            yield t


def _probe_input(value: ir.Value, n: int) -> np.ndarray:
    shape = [d if isinstance(d, int) else n for d in (value.shape or [])]
    dtype = value.dtype.numpy() if value.dtype is not None else np.float32
    return np.ones(shape, dtype=dtype)


def _is_lower_triangle(results: list[np.ndarray], additive: bool) -> bool:
    """Causal at each probe length: the lower triangle aligned bottom-right (queries at the last
    Sq of Sk positions, as after a KV cache)."""
    return _is_band(results, additive, None, 0)


def _is_band(results: list[np.ndarray], additive: bool, window: int | None, ahead: int | None) -> bool:
    """At each probe length, the pairs p - window < j <= p + ahead (an edge that is None: none)
    attended and no other, for queries at p = i + Sk - Sq."""
    for n, arr in zip(PROBE_LENGTHS, results, strict=False):
        if arr.ndim < 2 or arr.shape[-2] != n or arr.shape[-1] < n:
            return False
        sq, sk = arr.shape[-2:]
        t = np.arange(sk)[None, :] - np.arange(sq)[:, None] - (sk - sq)
        band = (t <= (ahead if ahead is not None else sk)) & (t > -(window if window is not None else sk + 1))
        allowed = (arr > NEG_LIMIT) if additive else arr.astype(bool)
        if additive and not np.all(np.where(band, arr, 0) == 0):
            return False
        if not np.all(allowed == band):
            return False
    return True


def _all_true(results: list[np.ndarray]) -> bool:
    return all(bool(np.all(r.astype(bool))) for r in results)


@dataclass(frozen=True)
class Kept:
    """What the analysis keeps of a mask: the graph's own value, or a new node over what it
    keeps of the node's inputs (an And of the kept terms, a Where over the kept condition, an
    elementwise op over a value without its Expand). Built only in the rewrite step."""

    value: ir.Value | None = None  # kept as the graph has it
    op: str = ""  # the new node: op(*parts, *fill)
    parts: tuple[Kept, ...] = ()
    fill: tuple[ir.Value, ...] = ()  # inputs after the parts (Where's zero and negative values)
    attributes: tuple[ir.Attr, ...] = ()  # the new node's (a Cast's type)
    dtype: ir.DataType | None = None  # the new node's element type, where known

    def build(self, builder: Builder, built: dict[int, ir.Value] | None = None) -> ir.Value:
        """The value; `built` holds what is built already (a part used twice is built once)."""
        if self.value is not None:
            return self.value
        built = {} if built is None else built
        if id(self) not in built:
            parts = [p.build(builder, built) for p in self.parts]
            out = builder.op(self.op, [*parts, *self.fill], **{a.name: a for a in self.attributes})
            if self.dtype is not None:
                out.dtype = self.dtype
            built[id(self)] = out
        return built[id(self)]


@dataclass
class MaskSplit:
    """A mask without its proven causal and all-true terms."""

    kept: Kept | None  # what is left for the op's mask input; None = nothing
    causal: bool = False
    window: int | None = None  # a proven sliding window (no key j <= p - window): the op's sliding_window
    ahead: int | None = None  # a proven limit ahead (no key j > p + ahead, > 0): the op's window_ahead
    notes: list[str] = field(default_factory=list)
    square: bool = False  # the attention's query and key lengths are provably equal
    constants: list[int] = field(default_factory=list)  # integers the mask computes with (windows...)
    built: ir.Value | None = field(default=None, repr=False)

    def build(self, builder: Builder) -> ir.Value | None:
        """The remaining mask as a graph value; built once and shared by every site using it."""
        if self.kept is None:
            return None
        if self.built is None:
            self.built = self.kept.build(builder)
        return self.built


class MaskAnalyzer:
    """Splits masks into (remaining mask, is_causal); reads the graph only (MaskSplit.build
    adds the nodes of what remains).

    A term is dropped only when `mask_proof` proves it causal or all-true at every length
    and an evaluation at the probe lengths agrees; every other term stays in the mask."""

    def __init__(self, model: ir.Model) -> None:
        self.prober = MaskProber(model)
        self.algebra = MaskAlgebra()
        self.done: dict[tuple[int, bool, bool], MaskSplit] = {}
        self.unexpanded: dict[int, Kept] = {}

    def same_length(self, query: ir.Value | None, key: ir.Value | None, axes: tuple[int, int]) -> bool:
        """The attention's query and key lengths (axes[0] of query, axes[1] of key) are provably equal."""
        if query is None or key is None:
            return False
        try:
            q, k = self.algebra.shape_of(query), self.algebra.shape_of(key)
        except Unknown:
            return False
        return len(q) > axes[0] and len(k) > axes[1] and q[axes[0]] == k[axes[1]]

    def split(self, mask: ir.Value, additive: bool, square: bool) -> MaskSplit:
        """`square`: the attention's query and key lengths are provably equal."""
        key = (id(mask), additive, square)
        if key not in self.done:
            result = MaskSplit(None, square=square, constants=mask_constants(mask))
            kept, result.causal = self._split(mask, additive, result)
            result.kept = self._without_expand(kept)
            if result.kept is not None and not self._key_mask(result.kept):
                result.notes.append(
                    f"kept mask {mask.name}: a value per query and key (query axis not provably 1)"
                )
            self.done[key] = result
        return self.done[key]

    def _without_expand(self, kept: Kept | None) -> Kept | None:
        """`kept` with each Expand under its elementwise ops replaced by what it expands. Exact:
        the op broadcasts its mask to the scores' shape, each axis of X has size 1 or the size
        Expand(X) has there, and elementwise ops commute with broadcasting, so every pair reads
        the same element (a [B, 1, 1, Sk] key mask stays one). Rebuilt in the rewrite step; the
        graph's value stays for its other users."""
        if kept is None:
            return None
        if kept.value is not None:
            new = self._unexpanded(kept.value, depth=0)
            return kept if new.value is kept.value else new
        parts = tuple(self._without_expand(p) for p in kept.parts)
        if all(new is old for new, old in zip(parts, kept.parts, strict=True)):
            return kept
        return replace(kept, parts=parts)

    def _unexpanded(self, value: ir.Value, depth: int) -> Kept:
        """`value` rebuilt over its Expands' inputs through elementwise ops (Kept(value) where
        that changes nothing); one Kept per value, so a shared input is built once."""
        if id(value) in self.unexpanded:
            return self.unexpanded[id(value)]
        node = producer(value, "Expand", *_ELEMENTWISE) if depth < _MAX_ELEMENTWISE_DEPTH else None
        if node is not None and any(i is None for i in node.inputs):
            node = None  # none of these ops has an optional input: a graph they do not describe
        kept = Kept(value)
        if node is not None and node.op_type == "Expand":
            kept = self._unexpanded(node.inputs[0], depth + 1)
        elif node is not None:
            parts = tuple(self._unexpanded(i, depth + 1) for i in node.inputs)
            if any(p.value is not i for p, i in zip(parts, node.inputs, strict=True)):
                attributes = tuple(ir.Attr(a.name, a.type, a.value) for a in node.attributes.values())
                kept = Kept(op=node.op_type, parts=parts, attributes=attributes, dtype=value.dtype)
        self.unexpanded[id(value)] = kept
        return kept

    def _key_mask(self, kept: Kept) -> bool:
        """Every graph value the kept mask is computed from has a query axis (the second last,
        as the op aligns shapes) of size 1, or none: the mask is one row of keys per head."""
        leaves = [kept.value] if kept.value is not None else list(kept.fill)
        if kept.value is None and not all(self._key_mask(p) for p in kept.parts):
            return False
        for leaf in leaves:
            try:
                shape = self.algebra.shape_of(leaf)
            except Unknown:
                return False
            if len(shape) >= 2 and shape[-2] != ONE:
                return False
        return True

    def _split(self, mask: ir.Value, additive: bool, out: MaskSplit) -> tuple[Kept | None, bool]:
        if not additive:
            return self._split_bool(strip_expand(mask), out)
        if _value_independent(mask) is not None:
            term = self._term(mask, True, out)
            if term is not None:
                return self._apply(term, mask, out)
        where = producer(mask, "Where")
        if where is None:
            return Kept(mask), False
        cond, zero, neg = where.inputs
        if const_scalar(zero) != 0.0 or (const_scalar(neg) or 0.0) > NEG_LIMIT:
            return Kept(mask), False
        cond = strip_expand(cond)
        new_cond, causal = self._split_bool(cond, out)
        if new_cond is None:
            return None, causal
        if new_cond.value is cond:
            return Kept(mask), causal
        return Kept(op="Where", parts=(new_cond,), fill=(zero, neg)), causal

    def _split_bool(self, cond: ir.Value, out: MaskSplit) -> tuple[Kept | None, bool]:
        """(cond without its causal or all-true terms, causal found); None = all true."""
        independent = _value_independent(cond) is not None
        if independent:
            term = self._term(cond, False, out)
            if term is not None:
                return self._apply(term, cond, out)
        node = producer(cond, "And", "Cast", "Expand", "Slice")
        if node is not None and node.op_type == "Slice" and not self.algebra.keeps_everything(node):
            node = None  # a slice that may cut the mask: kept as it is
        if node is None or (node.op_type == "Cast" and node.inputs[0].dtype != ir.DataType.BOOL):
            if independent:
                out.notes.append(
                    f"kept mask term {cond.name}: not provably causal or all-true at every length"
                )
            return Kept(cond), False
        if node.op_type in ("Cast", "Expand", "Slice"):  # the same elements, or broadcast by the op
            inner, causal = self._split_bool(node.inputs[0], out)
            return (Kept(cond) if inner is not None and inner.value is node.inputs[0] else inner), causal
        parts = [self._split_bool(i, out) for i in node.inputs]
        causal = any(found for _, found in parts)
        if all(k is not None and k.value is i for (k, _), i in zip(parts, node.inputs, strict=False)):
            return Kept(cond), causal
        kept = [k for k, _ in parts if k is not None]
        if not kept:
            return None, causal
        if len(kept) == 1:
            return kept[0], causal
        return Kept(op="And", parts=tuple(kept)), causal

    def _term(self, value: ir.Value, additive: bool, out: MaskSplit) -> Term | None:
        """The proven term; a proof that the probe lengths contradict counts as no proof."""
        term = classify(self.algebra, value, additive, out.square)
        if term is None or term.kind not in ("all", "causal", "band"):
            return term
        probe = self.prober.evaluate(value)
        if probe is None or _probe_agrees(probe, term, additive):
            return term
        out.notes.append(f"kept mask term {value.name}: its evaluation contradicts its proof")
        return Term("other")

    @staticmethod
    def _apply(term: Term, value: ir.Value, out: MaskSplit) -> tuple[Kept | None, bool]:
        if term.kind == "all":
            return None, False
        if term.kind == "causal":
            return None, True
        if term.kind == "band":  # is_causal, sliding_window and window_ahead express it exactly
            if term.window is not None:
                out.window = term.window if out.window is None else min(out.window, term.window)
            if term.ahead is not None and term.ahead > 0:
                out.ahead = term.ahead if out.ahead is None else min(out.ahead, term.ahead)
            return None, term.ahead == 0
        out.notes.append(f"kept mask term {value.name}: not provably causal or all-true at every length")
        return Kept(value), False


def _probe_agrees(results: list[np.ndarray], term: Term, additive: bool) -> bool:
    if term.kind == "causal":
        return _is_lower_triangle(results, additive)
    if term.kind == "band":
        return _is_band(results, additive, term.window, term.ahead)
    if additive:
        return all(np.all(r == 0) for r in results)
    return _all_true(results)


def mask_dtype_fix(builder: Builder, mask: ir.Value, query_dtype: Any) -> ir.Value:
    """Additive masks must have the query's type; bool stays bool."""
    if mask.dtype in (None, ir.DataType.BOOL, query_dtype):
        return mask
    return builder.op("Cast", [mask], to=query_dtype)


def bias_dtype_fix(builder: Builder, bias: ir.Value, query_dtype: Any) -> ir.Value:
    """The op takes a bias of the query's type or float32; anything else becomes the query's."""
    if bias.dtype in (None, ir.DataType.FLOAT, query_dtype):
        return bias
    return builder.op("Cast", [bias], to=query_dtype)


def _has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())
