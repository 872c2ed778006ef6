"""Shared pieces of the attention matchers: the site record, IR helpers, node building."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir

from tfsa_onnx import DOMAIN, OP_TYPE, OP_VERSION
from tfsa_onnx.config import attribute_value

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
# An additive mask value at or below this is "never attend" (finfo(float16).min is -65504).
NEG_LIMIT = -1e4


class GiveUp(Exception):
    """A matcher cannot prove a candidate is attention it can replace; the message says why."""


class NotAttention(GiveUp):
    """The anchor is not attention at all (e.g. a classifier's Softmax): not a site."""


@dataclass
class Inputs:
    """The op's query [B, Hq, Sq, D], key [B, Hkv, Sk, D] and value [B, Hkv, Sk, Dv]."""

    query: ir.Value
    key: ir.Value
    value: ir.Value


@dataclass
class Match:
    """What a matcher proved about one attention block, read from the graph without changing it.

    The values are the graph's own; `inputs` builds the op's Q, K, V from them in the rewrite
    step (None: query, key and value already are the op's inputs)."""

    query: ir.Value | None  # as found; None where the block computes it (packed projections)
    key: ir.Value | None  # the op's key is Transpose(key, key_perm) when key_perm is set
    value: ir.Value | None
    output: ir.Value  # the value the op's output (after `finish`) replaces
    scale: float | None  # None: 1/sqrt(head_dim) as the op computes it
    mask: ir.Value | None = None  # as found in the graph: the mask analysis splits it
    mask_additive: bool = True
    mask_scale: float = 1.0  # the graph scales the scores by this after adding the mask
    # Builds the op's attn_bias in the rewrite step: the additive score terms that are not a
    # mask (relative positions, ALiBi), never analysed as a mask, so nothing in them is dropped.
    bias: Callable[[Builder], ir.Value] | None = None
    is_causal: bool = False
    sliding_window: int | None = None  # keys before p - W + 1 hidden (proven from the mask)
    window_ahead: int | None = None  # keys after p + A hidden, A > 0 (proven; a bidirectional band)
    softcap: float | None = None  # scores c * tanh(scale * qk / c) before the terms (Gemma 2)
    key_perm: list[int] | None = None
    # Where the query and key lengths are in `query` and `key` (for the square-mask proof).
    length_axes: tuple[int, int] = (2, 2)
    inputs: Callable[[Builder], Inputs] | None = None
    # A mask the block implies rather than carries (a key-padding index): built in the rewrite
    # step and given to the op as it is, without the mask analysis.
    implied_mask: Callable[[Builder], ir.Value] | None = None
    # Optional: turns the op's Y [B, Hq, Sq, Dv] into what `output` was (fused ops pack it).
    finish: Callable[[Builder, ir.Value], ir.Value] | None = None
    dtype: ir.DataType | None = None  # element type, where shape inference cannot tell
    heads: int | None = None  # where the shapes cannot tell
    kv_heads: int | None = None
    head_dim: int | None = None
    # Optional: rewrite(graph, tunables) replaces the anchor node itself (drop-in ops such as
    # GroupQueryAttention); the pass then builds no SparseAttention node.
    rewrite: Callable[[ir.Graph, dict[str, Any]], None] | None = None

    def element_type(self) -> ir.DataType | None:
        for v in (self.query, self.output):
            if v is not None and v.dtype is not None:
                return v.dtype
        return self.dtype

    def build_inputs(self, builder: Builder) -> Inputs:
        if self.inputs is not None:
            return self.inputs(builder)
        key = self.key if self.key_perm is None else builder.transpose(self.key, self.key_perm)
        return Inputs(self.query, key, self.value)


def op_match(node: ir.Node, query, key, value, **fields: Any) -> Match:
    """The Match of an attention op node (query, key, value as found): the op's first output is
    what it replaces, and its `scale` attribute (0 or absent: 1/sqrt(head_dim)) its scale."""
    return Match(query, key, value, node.outputs[0], attr(node, "scale") or None, **fields)


class Rule(Protocol):
    """One attention family's matcher.

    is_anchor(node): the node a block of this family is found from. match(anchor): the block's
    Match, or GiveUp/NotAttention with the reason. match() only reads the graph; the nodes a
    replacement needs are built by the rewrite step (Match.inputs, Match.finish).
    """

    family: str

    def is_anchor(self, node: ir.Node) -> bool: ...

    def match(self, anchor: ir.Node) -> Match: ...


class OpRule:
    """A Rule's anchor test when the anchor is one op type in some domains (every rule here)."""

    anchor_op: str
    anchor_domains: tuple[str, ...] = ("", "ai.onnx")

    def is_anchor(self, node: ir.Node) -> bool:
        return node.op_type == self.anchor_op and node.domain in self.anchor_domains


@dataclass
class Site:
    """One attention block found in a model (one report entry)."""

    name: str
    family: str
    layer: int = -1
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    masked: bool = False
    causal: bool = False
    replaced: bool = False
    reason: str = ""
    window: int | None = None  # a proven sliding window: the op's sliding_window
    window_ahead: int | None = None  # a proven limit ahead of each query: the op's window_ahead
    notes: list[str] = field(default_factory=list)  # what the mask analysis kept, and why
    mask_constants: list[int] = field(default_factory=list, repr=False)  # windows and the like
    node: ir.Node | None = field(default=None, repr=False)
    match: Match | None = field(default=None, repr=False)
    mask_split: Any = field(default=None, repr=False)  # masks.MaskSplit of the match's mask

    def as_dict(self) -> dict[str, Any]:
        keys = ("name", "family", "layer", "heads", "kv_heads", "head_dim", "masked", "causal", "window")
        out = {k: getattr(self, k) for k in (*keys, "window_ahead", "replaced")}
        out["reason"] = self.reason or None
        out["notes"] = list(self.notes)
        return out


# ---------------------------------------------------------------- reading the graph


def producer(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    """The node producing `value` if it is one of `op_types` in the default domain (any op if none)."""
    if value is None:
        return None
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None if op_types else node
    if op_types and node.op_type not in op_types:
        return None
    return node


def strip_expand(value: ir.Value) -> ir.Value:
    """What an Expand chain broadcasts: masks and biases are broadcast by the op itself."""
    node = producer(value, "Expand")
    while node is not None:
        value = node.inputs[0]
        node = producer(value, "Expand")
    return value


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind `value` (initializer or Constant node), else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    # A Constant node, read without onnx_ir's get_const_tensor: it renames the node's tensor.
    node = value.producer()
    if node is None or node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    if len(node.attributes) != 1:
        return None
    name, a = next(iter(node.attributes.items()))
    if a.is_ref():
        return None
    if name == "value":
        return a.value.numpy()
    if name in ("value_float", "value_floats"):
        return np.array(a.value, dtype=np.float32)
    if name in ("value_int", "value_ints"):
        return np.array(a.value, dtype=np.int64)
    return None


def feeding_constants(
    value: ir.Value, domains: tuple[str, ...] | None = None, limit: int | None = None
) -> Iterator[np.ndarray]:
    """The constants `value` is computed from: a walk up the producers through nodes of
    `domains` (None: any domain), visiting at most `limit` values (None: all). Never through
    Shape or Size: only sizes flow out of them, not the constants behind their inputs."""
    stack, seen = [value], set()
    while stack and (limit is None or len(seen) < limit):
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        arr = const_array(v)
        if arr is not None:
            yield arr
            continue
        node = v.producer()
        if (
            node is not None
            and (domains is None or node.domain in domains)
            and node.op_type not in ("Shape", "Size")
        ):
            stack.extend(node.inputs)


def const_scalar(value: ir.Value | None) -> float | None:
    """A constant with a single element, as a float."""
    arr = const_array(value)
    if arr is None or arr.size != 1:
        return None
    return float(arr.reshape(()))


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    if a is None:
        return default
    return list(a.value) if isinstance(a.value, tuple) else a.value


def dims(value: ir.Value | None) -> list[int | str | None] | None:
    """Static shape as a list (int, symbolic name, or None); None if the rank is unknown."""
    if value is None or value.shape is None:
        return None
    out: list[int | str | None] = []
    for d in value.shape:
        if isinstance(d, int):
            out.append(d)
        else:
            out.append(d.value if d.value else None)
    return out


def rank(value: ir.Value | None) -> int | None:
    shape = dims(value)
    return None if shape is None else len(shape)


def same_dim(a: int | str | None, b: int | str | None) -> bool:
    """True when two dims are provably equal."""
    return a is not None and a == b


def single_consumer(value: ir.Value) -> ir.Node | None:
    users = {id(n): n for n, _ in value.uses()}
    if len(users) != 1 or value.is_graph_output():
        return None
    return next(iter(users.values()))


def site_name(node: ir.Node) -> str:
    """A stable, readable site name: the module path (dynamo metadata) + node name."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            import ast

            path = ""
            for scope in ast.literal_eval(scopes):
                if scope.startswith(path):
                    path = scope
            if path:
                return f"{path}/{node.name}"
        except (ValueError, SyntaxError):
            pass
    # Unnamed nodes: their first output's name is fixed by the file, so the name is the same
    # on every run (config globs and reports rely on that).
    return node.name or f"{node.op_type}_{node.outputs[0].name}"


def static_int(d: int | str | None) -> int | None:
    return d if isinstance(d, int) else None


def heads_of(value: ir.Value, head_dim: int | None, perm: list[int] | None = None) -> int | None:
    """Head count of a [B, H, S, D] value (of Transpose(value, perm) when perm is set): from its
    shape, or from the packed [B, S, H*D] tensor it was reshaped from (TorchScript exports leave
    H as -1 in the Reshape)."""
    shape = dims(value)
    axis = 1 if perm is None else perm[1]
    if shape is not None and len(shape) == 4 and isinstance(shape[axis], int):
        return shape[axis]
    if perm is not None:
        return _split_heads_count(value, head_dim) if perm == [0, 2, 1, 3] else None
    node = producer(value, "Transpose")
    for _ in range(3):  # rotary embeddings: Add(Mul(x, cos), Mul(rotate(x), sin))
        if node is not None:
            break
        node = producer(value, "Add", "Mul", "Cast")
        value = node.inputs[0] if node is not None else value
        node = producer(value, "Transpose")
    if node is None or attr(node, "perm") != [0, 2, 1, 3]:
        return None
    return _split_heads_count(node.inputs[0], head_dim)


def _split_heads_count(value: ir.Value, head_dim: int | None) -> int | None:
    """H of a [B, S, H, D] value made by Reshape from [B, S, H*D]."""
    reshape = producer(value, "Reshape")
    if reshape is None:
        return None
    target = const_array(reshape.inputs[1])
    if target is not None and target.size == 4 and target[2] > 0:
        return int(target[2])
    packed = dims(reshape.inputs[0])
    if head_dim and packed and isinstance(packed[-1], int) and packed[-1] % head_dim == 0:
        return packed[-1] // head_dim
    return None


# ---------------------------------------------------------------- building nodes


class Builder:
    """Inserts new nodes before an anchor node, keeping the graph topologically sorted."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, prefix: str) -> None:
        self.graph = graph
        self.anchor = anchor
        self.prefix = prefix
        self.count = 0

    def op(
        self,
        op_type: str,
        inputs: list[ir.Value | None],
        domain: str = "",
        num_outputs: int = 1,
        **attributes: Any,
    ) -> ir.Value | tuple[ir.Value, ...]:
        self.count += 1
        name = f"{self.prefix}/{op_type}_{self.count}"
        node = ir.Node(
            domain,
            op_type,
            inputs,
            attributes=ir.convenience.convert_attributes(attributes),
            num_outputs=num_outputs,
            name=name,
        )
        for i, out in enumerate(node.outputs):
            out.name = f"{name}_out{i}"
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0] if num_outputs == 1 else tuple(node.outputs)

    def const(self, array: np.ndarray, name: str) -> ir.Value:
        """An initializer (registered with the graph)."""
        self.count += 1
        value = ir.Value(name=f"{self.prefix}/{name}_{self.count}", const_value=ir.tensor(array))
        value.shape = ir.Shape(array.shape)
        value.dtype = ir.DataType.from_numpy(array.dtype)
        self.graph.register_initializer(value)
        return value

    def ints(self, values: list[int], name: str = "shape") -> ir.Value:
        return self.const(np.asarray(values, dtype=np.int64), name)

    def transpose(self, value: ir.Value, perm: list[int]) -> ir.Value:
        if perm == list(range(len(perm))):
            return value
        return self.op("Transpose", [value], perm=perm)


def sparse_attention_node(
    builder: Builder,
    match: Match,
    inputs: Inputs,
    mask: ir.Value | None,
    tunables: dict[str, Any],
    name: str,
    bias: ir.Value | None = None,
) -> ir.Value:
    """Insert the ai.tfsa::SparseAttention node for `match` and return its Y output."""
    scale = match.scale
    if scale is None:
        head_dim = static_int((dims(inputs.query) or [None])[-1]) or match.head_dim
        scale = 1.0 / math.sqrt(head_dim) if head_dim else 0.0
    attributes: dict[str, Any] = {"scale": float(scale), "is_causal": int(match.is_causal)}
    if match.is_causal:  # bottom-right causal: the queries are the last positions (a KV cache)
        attributes["query_positions"] = 1
    if match.sliding_window:
        attributes["sliding_window"] = int(match.sliding_window)
    if match.window_ahead is not None and not match.is_causal:  # causality limits more
        attributes["window_ahead"] = int(match.window_ahead)
    if match.softcap:
        attributes["softcap"] = float(match.softcap)
    for key, val in tunables.items():
        if val != ():  # an empty list setting (head_thresholds) is no attribute
            attributes[key] = attribute_value(val)
    if bias is not None and mask is None:
        # onnxruntime 1.17 crashes creating a session whose custom op has an empty optional
        # input before a given one: a one-element true mask instead (it changes nothing).
        mask = builder.const(np.ones(1, dtype=bool), "no_mask")
    optional = [mask, bias] if bias is not None else [mask] if mask is not None else []
    node = ir.Node(
        DOMAIN,
        OP_TYPE,
        [inputs.query, inputs.key, inputs.value, *optional],
        attributes=ir.convenience.convert_attributes(attributes),
        num_outputs=1,
        name=name,
        version=OP_VERSION,
    )
    node.outputs[0].name = f"{name}_Y"
    builder.graph.insert_before(builder.anchor, node)
    return node.outputs[0]


def split_heads(builder: Builder, packed: ir.Value, heads: int) -> ir.Value:
    """[B, S, H*D] -> [B, H, S, D]."""
    x = builder.op("Reshape", [packed, builder.ints([0, 0, heads, -1])])
    return builder.op("Transpose", [x], perm=[0, 2, 1, 3])


def merge_heads(builder: Builder, y: ir.Value) -> ir.Value:
    """[B, H, S, Dv] -> [B, S, H*Dv]."""
    x = builder.op("Transpose", [y], perm=[0, 2, 1, 3])
    return builder.op("Reshape", [x, builder.ints([0, 0, -1])])


def outputs_unused(node: ir.Node, first: int = 1) -> bool:
    """True when the node's outputs from `first` on are absent or unused."""
    return all(not o.uses() and not o.is_graph_output() for o in node.outputs[first:] if o is not None)


def optional_input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def fold_repeat(value: ir.Value) -> ir.Value:
    """Reshape(Expand(Unsqueeze(x, 2))) repeats x's heads (GQA): the op takes x itself."""
    reshape = producer(value, "Reshape")
    expand = producer(reshape.inputs[0], "Expand") if reshape else None
    unsq = producer(expand.inputs[0], "Unsqueeze") if expand else None
    if unsq is None or rank(unsq.inputs[0]) != 4 or rank(expand.outputs[0]) != 5:
        return value
    axes = attr(unsq, "axes")
    if axes is None and len(unsq.inputs) > 1:
        arr = const_array(unsq.inputs[1])
        axes = None if arr is None else [int(a) for a in arr.reshape(-1)]
    if axes not in ([2], [-3]):
        return value
    x, out = dims(unsq.inputs[0]), dims(value)
    # Where shapes are known they must agree: [B, Hkv, S, D] -> [B, n*Hkv, S, D].
    for i in (0, 2, 3):
        if x[i] is not None and out[i] is not None and x[i] != out[i]:
            return value
    if isinstance(x[1], int) and isinstance(out[1], int) and out[1] % x[1]:
        return value
    return unsq.inputs[0]
