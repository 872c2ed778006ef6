"""What a mask term computes at every sequence length, proven from its graph.

A mask term that depends on the inputs only through their shapes (a causal triangle, a
sliding window, an all-true filler) is evaluated symbolically instead of at a few lengths:
- a size is affine in the graph's symbolic dims (`Dim`, e.g. seq - 1),
- an index tensor (Range, and whatever broadcasts, shifts or scales it) holds at each
  element an affine function of that element's indices (`Grid`),
- a comparison of index tensors is a linear condition on the indices (`Cond`).
On the mask's last two axes (query i, key j), a condition that depends on t = j - i alone
is a union of intervals of t, so it is decided exactly for every length: all true, causal
(t <= 0), a band -W < t <= A around the diagonal (either edge may be missing: a sliding window
has A = 0, a bidirectional local layer both), or something else. Anything outside this algebra
is unknown; the caller keeps what is unknown, since a kept term costs speed while a dropped
one changes the model. Indices are exact up to 2**24 positions (Range cast to float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from tfsa_onnx import DOMAIN, OP_TYPE
from tfsa_onnx.rewrite.common import NEG_LIMIT, attr, const_array, feeding_constants

Scalar = int | float
# The name prefix of a symbol that stands for a number of unknown sign (size arithmetic outside
# the affine algebra); every other symbol is a size, >= 0.
UNSIGNED = "~"
_MAX_CONST_ELEMENTS = 4096  # larger constants are not mask index arithmetic
_INT_TYPES = {ir.DataType.INT64, ir.DataType.INT32, ir.DataType.INT16, ir.DataType.INT8, ir.DataType.UINT8}


class Unknown(Exception):
    """The term leaves the algebra this module can prove things in."""


# ---------------------------------------------------------------- sizes and offsets


@dataclass(frozen=True)
class Dim:
    """const + sum(coef * symbol): a size or an offset, affine in the graph's symbolic dims."""

    const: Scalar = 0
    terms: tuple[tuple[str, int], ...] = ()

    @staticmethod
    def of(x: Any) -> Dim:
        if isinstance(x, Dim):
            return x
        if isinstance(x, (bool, np.bool_)):
            raise Unknown("a boolean used as a number")
        if isinstance(x, (int, np.integer)):
            return Dim(int(x))
        if isinstance(x, (float, np.floating)):
            return Dim(int(x) if float(x).is_integer() and abs(x) < 2**53 else float(x))
        raise Unknown(f"unexpected constant {x!r}")

    @staticmethod
    def symbol(name: str) -> Dim:
        return Dim(0, ((name, 1),))

    @property
    def is_const(self) -> bool:
        return not self.terms

    def __add__(self, other: Any) -> Dim:
        other = Dim.of(other)
        merged = dict(self.terms)
        for name, c in other.terms:
            merged[name] = merged.get(name, 0) + c
        return Dim(self.const + other.const, tuple(sorted((n, c) for n, c in merged.items() if c)))

    __radd__ = __add__

    def __neg__(self) -> Dim:
        return self.scaled(-1)

    def __sub__(self, other: Any) -> Dim:
        return self + (-Dim.of(other))

    def __rsub__(self, other: Any) -> Dim:
        return Dim.of(other) - self

    def scaled(self, k: Scalar) -> Dim:
        if self.terms and not float(k).is_integer():
            raise Unknown("a symbolic size times a fraction")
        return Dim(self.const * k, tuple((n, int(c * k)) for n, c in self.terms if c * k))

    def __mul__(self, other: Any) -> Dim:
        other = Dim.of(other)
        if other.is_const:
            return self.scaled(other.const)
        if self.is_const:
            return other.scaled(self.const)
        raise Unknown("a product of two symbolic sizes")

    __rmul__ = __mul__


ONE = Dim(1)


# ---------------------------------------------------------------- abstract tensors


@dataclass
class Arr:
    """A tensor of known shape and elements: constants and shape vectors (Dim or bool)."""

    values: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.values, np.ndarray):  # numpy gives scalars for 0-d results
            self.values = np.array(self.values, dtype=bool if isinstance(self.values, np.bool_) else object)

    @property
    def shape(self) -> tuple[Dim, ...]:
        return tuple(Dim(d) for d in self.values.shape)


@dataclass
class Grid:
    """Element at index x: offset + sum(coefs[a] * x[a]); sizes may be symbolic."""

    shape: tuple[Dim, ...]
    offset: Dim
    coefs: tuple[Scalar, ...]

    def __post_init__(self) -> None:
        # An axis of size 1 has index 0: its coefficient never matters (and must not once it broadcasts).
        self.coefs = tuple(0 if d == ONE else c for d, c in zip(self.shape, self.coefs, strict=True))


# A formula over linear conditions: ("atom", coefs, offset, rel) means offset + coefs . x  rel  0,
# rel in {"ge", "gt", "eq"}; ("and" | "or", f, g); ("not", f); ("const", bool).
Formula = tuple


@dataclass
class Cond:
    """A boolean tensor: element at index x is formula(x)."""

    shape: tuple[Dim, ...]
    formula: Formula


@dataclass
class Select:
    """Where(cond, on_true, on_false) with scalar branches: an additive mask."""

    cond: Cond
    on_true: float
    on_false: float

    @property
    def shape(self) -> tuple[Dim, ...]:
        return self.cond.shape


@dataclass
class AbsGrid:
    """|grid| element by element: only compared (|i - j| <= w, a bidirectional window), where
    each comparison is two linear ones."""

    grid: Grid

    @property
    def shape(self) -> tuple[Dim, ...]:
        return self.grid.shape


Abstract = Arr | Grid | AbsGrid | Cond | Select


def _map_atoms(f: Formula, fn) -> Formula:
    if f[0] == "atom":
        return fn(f)
    if f[0] == "const":
        return f
    return (f[0], *(_map_atoms(g, fn) for g in f[1:]))


def _atoms(f: Formula):
    if f[0] == "atom":
        yield f
    elif f[0] != "const":
        for g in f[1:]:
            yield from _atoms(g)


def _remap(x: Grid | Cond, shape: tuple[Dim, ...], source: list[int | None]) -> Grid | Cond:
    """The same elements on new axes: new axis a reads old axis source[a] (None: a new axis)."""

    def coefs(old: tuple[Scalar, ...]) -> tuple[Scalar, ...]:
        out = tuple(0 if s is None else old[s] for s in source)
        return tuple(0 if d == ONE else c for d, c in zip(shape, out, strict=True))

    if isinstance(x, Grid):
        return Grid(shape, x.offset, coefs(x.coefs))
    return Cond(shape, _map_atoms(x.formula, lambda a: ("atom", coefs(a[1]), a[2], a[3])))


def _uniform(x: Abstract) -> bool:
    """One value everywhere (a filler such as an all-ones padding mask)."""
    if isinstance(x, Grid):
        return not any(x.coefs)
    if isinstance(x, Cond):
        return all(not any(a[1]) for a in _atoms(x.formula))
    return False


def _refill(x: Grid | Cond, shape: tuple[Dim, ...]) -> Grid | Cond:
    """The uniform x at another shape."""
    if isinstance(x, Grid):
        return Grid(shape, x.offset, (0,) * len(shape))
    return Cond(shape, _map_atoms(x.formula, lambda a: ("atom", (0,) * len(shape), a[2], a[3])))


def _broadcast_shape(*shapes: tuple[Dim, ...], minima: dict | None = None) -> tuple[Dim, ...]:
    """numpy broadcasting of proven sizes. `minima` (MaskAlgebra.minima): sizes known as
    min(a, c), c >= 1, which broadcast against a itself give a wherever the op runs (a <= c:
    both are a; a > c: min is c, and only c = 1 broadcasts)."""
    rank = max(len(s) for s in shapes)
    out = []
    for axis in range(rank):
        dims = {s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0} - {ONE}
        for d in list(dims) if minima and len(dims) > 1 else ():
            if d in minima and minima[d] in dims:
                dims.discard(d)
        if len(dims) > 1:
            raise Unknown("sizes that broadcast only if two symbolic sizes are equal")
        out.append(dims.pop() if dims else ONE)
    return tuple(out)


def _broadcast_to(x: Grid | Cond, shape: tuple[Dim, ...]) -> Grid | Cond:
    lead = len(shape) - len(x.shape)
    for axis, d in enumerate(x.shape):
        if d != ONE and d != shape[axis + lead]:
            raise Unknown("a size that does not broadcast")
    return _remap(x, shape, [None if a < lead else a - lead for a in range(len(shape))])


def _as_grid(x: Abstract) -> Grid:
    if isinstance(x, Grid):
        return x
    if isinstance(x, Arr) and x.values.size == 1 and x.values.dtype != bool:
        return Grid(x.shape, Dim.of(x.values.reshape(-1)[0]), (0,) * x.values.ndim)
    raise Unknown("not an index tensor")


def _as_cond(x: Abstract) -> Cond:
    if isinstance(x, Cond):
        return x
    if (
        isinstance(x, Arr)
        and x.values.dtype == bool
        and x.values.size
        and np.all(x.values == x.values.flat[0])
    ):
        return Cond(x.shape, ("const", bool(x.values.flat[0])))
    raise Unknown("not a condition")


def _scalar(x: Abstract) -> float:
    """A tensor with one value everywhere, as a float (additive-mask branches)."""
    if isinstance(x, Arr) and x.values.size == 1:
        v = x.values.reshape(-1)[0]
        if isinstance(v, Dim) and v.is_const:
            return float(v.const)
        if isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_)):
            return float(v)
    if isinstance(x, Grid) and not any(x.coefs) and x.offset.is_const:
        return float(x.offset.const)
    raise Unknown("not a scalar")


# ---------------------------------------------------------------- the evaluator


_COMPARE = {"Less": ("gt", True), "LessOrEqual": ("ge", True), "Greater": ("gt", False)}
_COMPARE |= {"GreaterOrEqual": ("ge", False), "Equal": ("eq", False)}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "And", "Or", "Xor", "Where", "Max", "Min", "Equal", "Less"}
_ELEMENTWISE |= {"LessOrEqual", "Greater", "GreaterOrEqual", "Not", "Neg", "Cast", "Abs", "Identity"}
_ELEMENTWISE |= {"Pow"}
# Ops whose (first) output has their first input's shape: unary maps, normalisations, and Clip,
# whose bounds are scalars.
_SAME_SHAPE = {"Cast", "Identity", "Not", "Neg", "Abs", "Sign", "Ceil", "Floor", "Round", "Log", "Exp"}
_SAME_SHAPE |= {"Sqrt", "Reciprocal", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu", "IsNaN", "IsInf", "Clip"}
_SAME_SHAPE |= {"Softmax", "LogSoftmax", "LayerNormalization", "Dropout", "Cos", "Sin", "Softplus"}


# Errors of a rule that meets a graph it does not expect: each means "unknown", not a bug here.
_EVAL_ERRORS = (ValueError, IndexError, KeyError, TypeError, AttributeError, ZeroDivisionError, OverflowError)


def _remembered(cache: dict, value: ir.Value, compute, errors: tuple) -> Any:
    """compute(value), computed once per value: an Unknown (or one of `errors`, as an Unknown) is
    remembered and raised again."""
    key = id(value)
    if key not in cache:
        try:
            cache[key] = compute(value)
        except Unknown as e:
            cache[key] = e
        except errors as e:
            cache[key] = Unknown(f"{type(e).__name__}: {e}")
    result = cache[key]
    if isinstance(result, Unknown):
        raise result
    return result


class MaskAlgebra:
    """Evaluates values of one model symbolically; results are cached per value."""

    def __init__(self) -> None:
        self.cache: dict[int, Abstract | Unknown] = {}
        # shape_of's answers: its rules recurse through every input, and a residual stream
        # reaches each earlier layer along many paths (exponential without this).
        self.shapes: dict[int, tuple[Dim, ...] | Unknown] = {}
        # Sizes a Slice clamps to a constant (position_ids[:, :seq] of 1,100 positions):
        # the symbol standing for min(a, c) -> a (_broadcast_shape).
        self.minima: dict[Dim, Dim] = {}

    def eval(self, value: ir.Value) -> Abstract:
        return _remembered(self.cache, value, self._eval, _EVAL_ERRORS)

    def shape_of(self, value: ir.Value) -> tuple[Dim, ...]:
        return _remembered(self.shapes, value, self._shape_of, ())

    def keeps_everything(self, node: ir.Node) -> bool:
        """Whether a Slice provably takes every element in order (mask[..., :key_length] of a mask
        that has key_length keys): each sliced axis whole, with steps > 0."""
        try:
            inputs = [i for i in node.inputs if i is not None]
            steps = self._vector(node, 4) if len(node.inputs) > 4 and node.inputs[4] is not None else [ONE]
            if any(not st.is_const or st.const <= 0 for st in steps):
                return False
            return self._shape_Slice(node, inputs) == self.shape_of(node.inputs[0])
        except (Unknown, *_EVAL_ERRORS):
            return False

    def _shape_of(self, value: ir.Value) -> tuple[Dim, ...]:
        node = value.producer()
        if node is not None or value.const_value is not None:
            try:
                return self.eval(value).shape
            except Unknown:
                pass
        if node is not None and node.domain in ("", "ai.onnx") and value is node.outputs[0]:
            try:
                return self._shape_rule(node)
            except Unknown:
                pass
        if node is not None and (node.domain, node.op_type) == (DOMAIN, OP_TYPE) and value is node.outputs[0]:
            try:  # a block replaced already: Y is [B, Hq, Sq, Dv] (later blocks read its sizes)
                query, v = self.shape_of(node.inputs[0]), self.shape_of(node.inputs[2])
                if len(query) == len(v) == 4:
                    return (*query[:3], v[3])
            except Unknown:
                pass
        if value.shape is None:
            raise Unknown(f"the shape of {value.name} is unknown")
        out = []
        for axis, d in enumerate(value.shape):
            if isinstance(d, int):
                out.append(Dim(d))
            elif d.value:
                out.append(Dim.symbol(d.value))
            else:  # an unnamed dim equals nothing else
                out.append(Dim.symbol(f"{value.name}[{axis}]"))
        return tuple(out)

    def _shape_rule(self, node: ir.Node) -> tuple[Dim, ...]:
        """The output shape of a node whose values are not index arithmetic (an embedding's
        Gather, a Reshape of an input), from its inputs' shapes."""
        inputs = [i for i in node.inputs if i is not None]
        if node.op_type in _SAME_SHAPE:
            return self.shape_of(inputs[0])
        if node.op_type in _ELEMENTWISE:
            return _broadcast_shape(*(self.shape_of(i) for i in inputs), minima=self.minima)
        if node.op_type == "Transpose":
            shape = self.shape_of(inputs[0])
            perm = attr(node, "perm", None) or list(reversed(range(len(shape))))
            return tuple(shape[p] for p in perm)
        if node.op_type == "Gather":
            data, idx = self.shape_of(inputs[0]), self.shape_of(inputs[1])
            axis = attr(node, "axis", 0) % len(data)
            return data[:axis] + idx + data[axis + 1 :]
        if node.op_type == "MatMul" and len(inputs) == 2:  # [.., n, k] @ [.., k, m]: [.., n, m]
            a, b = self.shape_of(inputs[0]), self.shape_of(inputs[1])
            if len(a) < 2 or len(b) < 2 or a[-1] != b[-2]:
                raise Unknown("a MatMul of unproven inner sizes")
            return (*_broadcast_shape(a[:-2], b[:-2]), a[-2], b[-1])
        if node.op_type == "Reshape":
            source = self.shape_of(inputs[0])
            target = [Dim.of(d) for d in self._in(node, 1).values.reshape(-1)]
            if not attr(node, "allowzero", 0):
                target = [source[a] if d == Dim(0) else d for a, d in enumerate(target)]
            if target.count(Dim(-1)) == 1:  # -1 is what the known dims leave of the source
                rest = [d for d in source if d != ONE]
                for d in target:
                    if d in (ONE, Dim(-1)):
                        continue
                    if d in rest:
                        rest.remove(d)
                        continue
                    k = _divisible(rest, d)  # an axis split ([B, S, 32] -> [B, S, 2, -1]; B*H -> B, H)
                    if k is not None:
                        rest[k] = _divided(rest[k], d.const)
                        continue
                    k = _multiple(rest, d)  # B*H -> B, -1 (BLOOM's split of its scores)
                    if k is not None:
                        rest[k] = Dim(_ratio(rest[k], d))
                        continue
                    pair = _factors(rest, d)  # two source axes merged into one (B*H)
                    if pair is None:
                        raise Unknown("a Reshape that merges axes")
                    rest = [x for k, x in enumerate(rest) if k not in pair]
                size = ONE
                for d in rest:  # -1 takes what is left: a product (one factor at most symbolic)
                    size = size * d
                target[target.index(Dim(-1))] = size
            return tuple(target)
        rule = getattr(self, f"_shape_{node.op_type}", None)
        if rule is None:
            raise Unknown(f"no shape rule for {node.op_type}")
        try:
            return rule(node, inputs)
        except _EVAL_ERRORS as e:  # a form of the op the rule does not expect (older opsets)
            raise Unknown(f"{node.op_type}: {type(e).__name__}") from None

    # shape rules of data tensors (DeBERTa's c2p and p2c: GatherElements over expanded,
    # clamped relative positions; embeddings of sliced position ids)

    def _vector(self, node: ir.Node, i: int) -> list[Dim]:
        """A 1-D size vector input (Expand's shape, Tile's repeats, Slice's starts ...)."""
        x = self._in(node, i)
        if not isinstance(x, Arr) or x.values.dtype == bool or x.values.ndim > 1:
            raise Unknown("a size vector that is not known")
        return [Dim.of(d) for d in x.values.reshape(-1)]

    def _shape_Unsqueeze(self, node, inputs):
        shape = list(self.shape_of(inputs[0]))
        axes = self._ints(node, 1) if len(inputs) > 1 else list(attr(node, "axes"))
        rank = len(shape) + len(axes)
        for a in sorted(a % rank for a in axes):
            shape.insert(a, ONE)
        return tuple(shape)

    def _shape_Squeeze(self, node, inputs):
        shape = self.shape_of(inputs[0])
        axes = self._ints(node, 1) if len(inputs) > 1 else attr(node, "axes", None)
        if axes is None:
            if any(not d.is_const for d in shape):
                raise Unknown("Squeeze of symbolic sizes without axes")
            axes = [a for a, d in enumerate(shape) if d == ONE]
        axes = {a % len(shape) for a in axes}
        if any(shape[a] != ONE for a in axes):
            raise Unknown("Squeeze of an axis that may not be 1")
        return tuple(d for a, d in enumerate(shape) if a not in axes)

    def _shape_Expand(self, node, inputs):
        return _broadcast_shape(self.shape_of(inputs[0]), tuple(self._vector(node, 1)), minima=self.minima)

    def _shape_Tile(self, node, inputs):
        shape, repeats = self.shape_of(inputs[0]), self._vector(node, 1)
        if len(repeats) != len(shape):
            raise Unknown("Tile repeats of another rank")
        return tuple(d * r for d, r in zip(shape, repeats, strict=True))

    def _shape_Concat(self, node, inputs):
        """Concat (a KV cache: past ++ new keys): the axis summed; every other axis is the same in
        all inputs wherever the op runs, so the first input's stands for it."""
        shapes = [self.shape_of(i) for i in inputs]
        if len({len(x) for x in shapes}) != 1:
            raise Unknown("Concat of different ranks")
        axis = attr(node, "axis") % len(shapes[0])
        total = Dim(0)
        for x in shapes:
            total = total + x[axis]
        return (*shapes[0][:axis], total, *shapes[0][axis + 1 :])

    def _shape_reduce(self, node, inputs):
        """ReduceMean and the like (RMSNorm's mean of squares): reduced axes kept as 1 or dropped."""
        shape = self.shape_of(inputs[0])
        axes = self._ints(node, 1) if len(inputs) > 1 else attr(node, "axes", None)
        if axes is None or not axes:  # all axes (noop_with_empty_axes aside, which we do not read)
            if attr(node, "noop_with_empty_axes", 0):
                raise Unknown("a Reduce with noop_with_empty_axes")
            axes = list(range(len(shape)))
        axes = {a % len(shape) for a in axes}
        if attr(node, "keepdims", 1):
            return tuple(ONE if a in axes else d for a, d in enumerate(shape))
        return tuple(d for a, d in enumerate(shape) if a not in axes)

    _shape_ReduceMean = _shape_ReduceSum = _shape_ReduceMax = _shape_ReduceMin = _shape_reduce

    def _shape_GatherElements(self, node, inputs):
        data, index = self.shape_of(inputs[0]), self.shape_of(inputs[1])
        if len(data) != len(index):
            raise Unknown("GatherElements of another rank")
        return index

    def _shape_Slice(self, node, inputs):
        shape = list(self.shape_of(inputs[0]))
        starts, ends = self._vector(node, 1), self._vector(node, 2)
        given = [i < len(node.inputs) and node.inputs[i] is not None for i in range(5)]
        axes = self._ints(node, 3) if given[3] else list(range(len(starts)))
        steps = self._vector(node, 4) if given[4] else [ONE] * len(starts)
        if not len(starts) == len(ends) == len(axes) == len(steps):
            raise Unknown("Slice inputs of different lengths")
        name = node.outputs[0].name
        for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
            a %= len(shape)
            shape[a] = self._sliced(shape[a], s, e, st, f"{name}[{a}]")
        return tuple(shape)

    def _sliced(self, d: Dim, start: Dim, end: Dim, step: Dim, name: str) -> Dim:
        """The length of d[start:end:step] where the sizes decide it."""
        if all(x.is_const for x in (d, start, end, step)) and step.const:
            return Dim(len(range(int(d.const))[int(start.const) : int(end.const) : int(step.const)]))
        if start != Dim(0) or step != ONE:
            raise Unknown("a Slice of a symbolic size that does not start at 0 with step 1")
        if end == d or (end.is_const and end.const >= 2**31 - 1):  # [:d], [:] as exported
            return d
        if d.is_const and d.const >= 1 and _bounds(end)[0] >= 0:
            # [:e] of c elements, e a size: min(e, c)
            m = Dim.symbol(f"min({name})")
            self.minima[m] = end
            return m
        raise Unknown("a Slice whose length depends on the sizes")

    def _eval(self, value: ir.Value) -> Abstract:
        node = value.producer()
        if node is None or node.op_type == "Constant":
            arr = const_array(value)
            if arr is None:
                raise Unknown(f"{value.name} depends on an input's values")
            return _constant(arr)
        if node.domain not in ("", "ai.onnx"):
            raise Unknown(f"{node.op_type} of domain {node.domain}")
        if len(node.outputs) != 1 and node.op_type != "Split":
            raise Unknown(f"{node.op_type} with several outputs")
        method = getattr(self, f"_op_{node.op_type}", None)
        if method is None:
            raise Unknown(f"{node.op_type} is not index arithmetic")
        return method(node, [None if i is None else i for i in node.inputs])

    def _in(self, node: ir.Node, i: int) -> Abstract:
        return self.eval(node.inputs[i])

    def _ints(self, node: ir.Node, i: int) -> list[int]:
        """A constant integer vector input (axes, perms, starts...)."""
        if len(node.inputs) <= i or node.inputs[i] is None:
            raise Unknown("a missing input")
        x = self._in(node, i)
        if not isinstance(x, Arr):
            raise Unknown("a vector that is not constant")
        out = []
        for v in x.values.reshape(-1):
            d = Dim.of(v)
            if not d.is_const or not float(d.const).is_integer():
                raise Unknown("a symbolic axis or index")
            out.append(int(d.const))
        return out

    # shapes

    def _op_Shape(self, node, inputs):
        dims = self.shape_of(inputs[0])
        start, end = attr(node, "start", 0), attr(node, "end", None)
        return Arr(np.array(list(dims[start:end]), dtype=object).reshape(-1))

    def _op_Size(self, node, inputs):
        total = Dim(1)
        for d in self.shape_of(inputs[0]):
            total = total * d
        return Arr(np.array(total, dtype=object))

    def _op_Identity(self, node, inputs):
        return self._in(node, 0)

    def _op_Cast(self, node, inputs):
        x = self._in(node, 0)
        to = ir.DataType(attr(node, "to"))
        if isinstance(x, Arr):
            return _cast_arr(x, to)
        if to == ir.DataType.BOOL:
            if isinstance(x, Cond):
                return x
            g = _as_grid(x)
            return Cond(g.shape, ("not", ("atom", g.coefs, g.offset, "eq")))
        if isinstance(x, (Grid, AbsGrid)) and (to in _INT_TYPES or to.is_floating_point()):
            if to in _INT_TYPES and not _integral(x if isinstance(x, Grid) else x.grid):
                raise Unknown("a fractional index cast to an integer")
            return x
        raise Unknown("a condition cast to a number")

    def _op_Sqrt(self, node, inputs):  # of a known size: DeBERTa's scale sqrt(head_dim * 3)
        x = self._in(node, 0)
        if not isinstance(x, Arr) or x.values.dtype == bool:
            raise Unknown("Sqrt of an index tensor or a condition")
        return Arr(np.vectorize(lambda d: Dim.of(math.sqrt(_const_of(d))), otypes=[object])(x.values))

    # index tensors

    def _op_Range(self, node, inputs):
        start, limit, delta = (_as_grid(self._in(node, i)) for i in range(3))
        if any(any(g.coefs) for g in (start, limit, delta)) or delta.offset not in (Dim(1), Dim(-1)):
            raise Unknown("a Range with a step other than 1 or -1")
        step = int(delta.offset.const)
        length = (limit.offset - start.offset).scaled(step)
        return Grid((length,), start.offset, (step,))

    def _op_ConstantOfShape(self, node, inputs):
        shape = tuple(Dim.of(d) for d in self._in(node, 0).values.reshape(-1))
        a = node.attributes.get("value")
        fill = a.value.numpy().reshape(-1)[0] if a is not None else 0.0
        if isinstance(fill, np.bool_):
            return Cond(shape, ("const", bool(fill)))
        return Grid(shape, Dim.of(fill), (0,) * len(shape))

    # layout

    def _op_Unsqueeze(self, node, inputs):
        x = self._in(node, 0)
        axes = self._ints(node, 1) if len(inputs) > 1 else list(attr(node, "axes"))
        rank = len(x.shape) + len(axes)
        axes = sorted(a % rank for a in axes)
        if isinstance(x, Arr):
            return Arr(np.expand_dims(x.values, tuple(axes)))
        x = _layout(x)
        old = iter(range(len(x.shape)))
        source = [None if a in axes else next(old) for a in range(rank)]
        shape = tuple(ONE if s is None else x.shape[s] for s in source)
        return _remap(x, shape, source)

    def _op_Squeeze(self, node, inputs):
        x = self._in(node, 0)
        if len(inputs) > 1 and inputs[1] is not None:
            axes = self._ints(node, 1)
        else:
            axes = attr(node, "axes", None)
            if axes is None:
                if any(not d.is_const for d in x.shape):
                    raise Unknown("Squeeze of symbolic sizes without axes")
                axes = [a for a, d in enumerate(x.shape) if d == ONE]
        axes = {a % len(x.shape) for a in axes}
        if isinstance(x, Arr):
            return Arr(np.squeeze(x.values, tuple(axes)) if axes else x.values)
        x = _layout(x)
        if any(x.shape[a] != ONE for a in axes):
            raise Unknown("Squeeze of an axis that may not be 1")
        source = [a for a in range(len(x.shape)) if a not in axes]
        return _remap(x, tuple(x.shape[a] for a in source), source)

    def _op_Transpose(self, node, inputs):
        x = self._in(node, 0)
        perm = attr(node, "perm", None) or list(reversed(range(len(x.shape))))
        if isinstance(x, Arr):
            return Arr(np.transpose(x.values, perm))
        x = _layout(x)
        return _remap(x, tuple(x.shape[p] for p in perm), list(perm))

    def _op_Expand(self, node, inputs):
        x = self._in(node, 0)
        target = tuple(Dim.of(d) for d in self._in(node, 1).values.reshape(-1))
        if isinstance(x, Arr):
            if any(not d.is_const for d in target):
                x = _as_grid(x) if x.values.dtype != bool else _as_cond(x)
            else:
                shape = [int(d.const) for d in target]
                return Arr(np.broadcast_to(x.values, np.broadcast_shapes(x.values.shape, shape)).copy())
        x = _layout(x)
        return _broadcast_to(x, _broadcast_shape(x.shape, target))

    def _op_Reshape(self, node, inputs):
        x = self._in(node, 0)
        target = [Dim.of(d) for d in self._in(node, 1).values.reshape(-1)]
        if not attr(node, "allowzero", 0):
            target = [x.shape[a] if d == Dim(0) else d for a, d in enumerate(target)]
        if isinstance(x, Arr) and all(d.is_const for d in target):
            return Arr(x.values.reshape([int(d.const) for d in target]))
        x = _layout(x)
        if _uniform(x):  # a filler keeps its value however its elements are arranged
            name = node.outputs[0].name
            return _refill(
                x, tuple(Dim.symbol(f"{name}[{a}]") if d == Dim(-1) else d for a, d in enumerate(target))
            )
        # Only reshapes that add or remove axes of size 1 keep the elements' indices.
        kept = [a for a, d in enumerate(x.shape) if d != ONE]
        slots = [a for a, d in enumerate(target) if d != ONE]
        if len(kept) != len(slots) or Dim(-1) in target:
            raise Unknown("a Reshape that merges or splits axes")
        source: list[int | None] = [None] * len(target)
        for old, new in zip(kept, slots, strict=True):
            if x.shape[old] != target[new]:
                raise Unknown("a Reshape that moves elements")
            source[new] = old
        return _remap(x, tuple(target), source)

    def _op_Flatten(self, node, inputs):
        x = _layout(self._in(node, 0))
        if not _uniform(x):
            raise Unknown("Flatten of an index tensor")
        axis = attr(node, "axis", 1) % (len(x.shape) + 1)
        name = node.outputs[0].name
        sizes = [ONE, ONE]
        for a, d in enumerate(x.shape):
            side = int(a >= axis)
            sizes[side] = _size_op("Mul", sizes[side], d, f"{name}[{side}]")
        return _refill(x, tuple(sizes))

    def _op_Concat(self, node, inputs):
        parts = [self.eval(i) for i in inputs]
        if not all(isinstance(p, Arr) for p in parts):
            raise Unknown("Concat of index tensors")
        return Arr(np.concatenate([p.values.astype(object) for p in parts], axis=attr(node, "axis")))

    def _op_Gather(self, node, inputs):
        data = self._in(node, 0)
        if not isinstance(data, Arr) and _uniform(data):  # any element of a filler is the filler
            axis = attr(node, "axis", 0) % len(data.shape)
            shape = (*data.shape[:axis], *self.shape_of(inputs[1]), *data.shape[axis + 1 :])
            return _refill(_layout(data), shape)
        idx = self._ints_arr(node, 1)
        if not isinstance(data, Arr):
            raise Unknown("Gather from an index tensor")
        return Arr(np.take(data.values, idx, axis=attr(node, "axis", 0)))

    def _ints_arr(self, node: ir.Node, i: int) -> np.ndarray:
        x = self._in(node, i)
        if not isinstance(x, Arr):
            raise Unknown("indices that are not constant")
        return np.array(self._ints(node, i), dtype=np.int64).reshape(x.values.shape)

    def _op_Slice(self, node, inputs):
        data = self._in(node, 0)
        if not isinstance(data, Arr):
            raise Unknown("Slice of an index tensor")
        starts, ends = self._ints(node, 1), self._ints(node, 2)
        axes = self._ints(node, 3) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
        steps = self._ints(node, 4) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
        index = [slice(None)] * data.values.ndim
        for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
            index[a] = slice(s, e, st)
        return Arr(data.values[tuple(index)])

    # arithmetic

    def _arith(self, node: ir.Node) -> Abstract:
        op = node.op_type
        a, b = _as_arrays(self._in(node, 0), self._in(node, 1))
        if _is_numbers(a) and _is_numbers(b):  # sizes: exact where affine, else a new symbol
            x, y = np.broadcast_arrays(a.values, b.values)
            name = node.outputs[0].name
            out = [
                _size_op(op, p, q, f"{name}[{k}]")
                for k, (p, q) in enumerate(zip(x.flat, y.flat, strict=True))
            ]
            return Arr(np.array(out, dtype=object).reshape(x.shape))
        a, b = _as_grid(a), _as_grid(b)
        shape = _broadcast_shape(a.shape, b.shape)
        a, b = _broadcast_to(a, shape), _broadcast_to(b, shape)
        if op == "Add":
            return Grid(
                shape, a.offset + b.offset, tuple(p + q for p, q in zip(a.coefs, b.coefs, strict=True))
            )
        if op == "Sub":
            return Grid(
                shape, a.offset - b.offset, tuple(p - q for p, q in zip(a.coefs, b.coefs, strict=True))
            )
        if op == "Mul":
            if any(a.coefs) or not a.offset.is_const:
                a, b = b, a
            if any(a.coefs) or not a.offset.is_const:
                raise Unknown("a product of two index tensors")
            k = a.offset.const
            return Grid(shape, b.offset.scaled(k), tuple(c * k for c in b.coefs))
        raise Unknown(f"{op} of an index tensor")

    def _op_Add(self, node, inputs):
        return self._arith(node)

    _op_Sub = _op_Mul = _op_Div = _op_Add

    def _op_Neg(self, node, inputs):
        x = self._in(node, 0)
        if isinstance(x, Arr):
            return Arr(np.vectorize(lambda p: -Dim.of(p), otypes=[object])(x.values))
        g = _as_grid(x)
        return Grid(g.shape, -g.offset, tuple(-c for c in g.coefs))

    def _op_Abs(self, node, inputs):
        x = self._in(node, 0)
        if isinstance(x, Arr) and x.values.dtype != bool:
            return Arr(np.vectorize(lambda p: Dim.of(abs(_const_of(p))), otypes=[object])(x.values))
        return AbsGrid(_as_grid(x))

    # conditions

    def _compare(self, node, inputs):
        rel, swap = _COMPARE[node.op_type]
        a, b = _as_arrays(self._in(node, 0), self._in(node, 1))
        if isinstance(a, Arr) and isinstance(b, Arr):
            concrete = _concrete_compare(node.op_type, a, b)
            if concrete is not None:
                return concrete
        if swap:
            a, b = b, a
        # a - b rel 0; |g| - b rel 0 is g - b rel 0 or -g - b rel 0, and a - |g| rel 0 is
        # a - g rel 0 and a + g rel 0 (not for equality)
        if isinstance(a, AbsGrid) or isinstance(b, AbsGrid):
            if rel == "eq" or (isinstance(a, AbsGrid) and isinstance(b, AbsGrid)):
                raise Unknown("an absolute value compared for equality or to another")
            join, g, other = (
                ("or", a.grid, _as_grid(b)) if isinstance(a, AbsGrid) else ("and", b.grid, _as_grid(a))
            )
            negated = Grid(g.shape, -g.offset, tuple(-c for c in g.coefs))
            pairs = ((g, other), (negated, other)) if join == "or" else ((other, g), (other, negated))
            first, second = (_linear_compare(x, y, rel) for x, y in pairs)
            return Cond(first.shape, (join, first.formula, second.formula))
        return _linear_compare(_as_grid(a), _as_grid(b), rel)

    _op_Less = _op_LessOrEqual = _op_Greater = _op_GreaterOrEqual = _op_Equal = _compare

    def _logic(self, node, inputs):
        parts = _as_arrays(*(self.eval(i) for i in node.inputs))
        if all(isinstance(p, Arr) and p.values.dtype == bool for p in parts):
            fn = {"And": np.logical_and, "Or": np.logical_or, "Xor": np.logical_xor}[node.op_type]
            return Arr(fn(parts[0].values, parts[1].values))
        a, b = (_as_cond(p) for p in parts)
        shape = _broadcast_shape(a.shape, b.shape)
        a, b = _broadcast_to(a, shape), _broadcast_to(b, shape)
        if node.op_type == "Xor":
            return Cond(
                shape, ("or", ("and", a.formula, ("not", b.formula)), ("and", ("not", a.formula), b.formula))
            )
        return Cond(shape, (node.op_type.lower(), a.formula, b.formula))

    _op_And = _op_Or = _op_Xor = _logic

    def _op_Not(self, node, inputs):
        x = self._in(node, 0)
        if isinstance(x, Arr) and x.values.dtype == bool:
            return Arr(np.logical_not(x.values))
        c = _as_cond(x)
        return Cond(c.shape, ("not", c.formula))

    def _op_Where(self, node, inputs):
        c, a, b = _as_arrays(*(self._in(node, i) for i in range(3)))
        if isinstance(c, Arr) and isinstance(a, Arr) and isinstance(b, Arr) and c.values.dtype == bool:
            return Arr(np.where(c.values, a.values, b.values))
        c = _as_cond(c)
        if _is_bool(a) and _is_bool(b):
            a, b = _as_cond(a), _as_cond(b)
            shape = _broadcast_shape(c.shape, a.shape, b.shape)
            c, a, b = (_broadcast_to(x, shape) for x in (c, a, b))
            return Cond(shape, ("or", ("and", c.formula, a.formula), ("and", ("not", c.formula), b.formula)))
        shape = _broadcast_shape(c.shape, a.shape, b.shape)
        return Select(_broadcast_to(c, shape), _scalar(a), _scalar(b))


def _linear_compare(a: Grid, b: Grid, rel: str) -> Cond:
    """a - b rel 0, broadcast."""
    shape = _broadcast_shape(a.shape, b.shape)
    a, b = _broadcast_to(a, shape), _broadcast_to(b, shape)
    coefs = tuple(p - q for p, q in zip(a.coefs, b.coefs, strict=True))
    return Cond(shape, ("atom", coefs, a.offset - b.offset, rel))


def _as_arrays(*xs: Abstract) -> list[Abstract]:
    """Beside a tensor of known elements, uniform index tensors and conditions of a small constant
    shape become the tensors they are, so that they combine element by element (torch's expand
    exports its shape as Where(Equal(shape, ConstantOfShape(3) * -1), ConstantOfShape(3), shape))."""
    if not any(isinstance(x, Arr) and x.values.size > 1 for x in xs):
        return list(xs)
    return [_filled(x) if isinstance(x, (Grid, Cond)) else x for x in xs]


def _filled(x: Grid | Cond) -> Abstract:
    if not _uniform(x) or not all(d.is_const for d in x.shape):
        return x
    shape = tuple(int(d.const) for d in x.shape)
    if math.prod(shape) > _MAX_CONST_ELEMENTS:
        return x
    if isinstance(x, Grid):
        return Arr(np.full(shape, x.offset, dtype=object))
    if any(not a[2].is_const for a in _atoms(x.formula)):
        return x
    return Arr(np.full(shape, _holds(x.formula, 0), dtype=bool))


def _is_numbers(x: Abstract) -> bool:
    return isinstance(x, Arr) and x.values.dtype != bool


def _factors(sizes: list[Dim], product: Dim) -> tuple[int, int] | None:
    """Positions of two adjacent sizes whose product is `product` (one of them constant)."""
    for k in range(len(sizes) - 1):
        try:
            if sizes[k] * sizes[k + 1] == product:
                return k, k + 1
        except Unknown:
            continue
    return None


def _divisible(sizes: list[Dim], d: Dim) -> int | None:
    """The index of the first size that a known d > 1 divides for every value of its symbols
    (32 by 2, 2 * B by 2), if any."""
    if not d.is_const or not isinstance(d.const, int) or d.const <= 1:
        return None
    for k, x in enumerate(sizes):
        if isinstance(x.const, int) and x.const % d.const == 0 and all(c % d.const == 0 for _, c in x.terms):
            return k
    return None


def _multiple(sizes: list[Dim], d: Dim) -> int | None:
    """The index of the first size that is a whole multiple k >= 1 of a symbolic d (2 * B of B)."""
    if d.is_const:
        return None
    return next((k for k, x in enumerate(sizes) if _ratio(x, d) is not None), None)


def _ratio(x: Dim, d: Dim) -> int | None:
    name, c = d.terms[0]
    k = dict(x.terms).get(name, 0) / c
    return int(k) if k >= 1 and float(k).is_integer() and d.scaled(int(k)) == x else None


def _divided(x: Dim, k: int) -> Dim:
    """x / k for a size `_divisible` found."""
    return Dim(x.const // k, tuple((n, c // k) for n, c in x.terms))


def _size_op(op: str, p: Any, q: Any, name: str) -> Dim:
    """p op q on sizes; a result outside the affine algebra becomes a symbol of its own."""
    p, q = Dim.of(p), Dim.of(q)
    try:
        if op == "Add":
            return p + q
        if op == "Sub":
            return p - q
        if op == "Mul":
            return p * q
        if p.is_const and q.is_const and q.const != 0:
            integers = isinstance(p.const, int) and isinstance(q.const, int)
            return Dim.of(int(p.const / q.const) if integers else p.const / q.const)
        if q.is_const and isinstance(q.const, int) and q.const != 0 and isinstance(p.const, int):
            # (k * x) / k: exact for every x when k divides every coefficient (BLOOM's B*H / H)
            if p.const % q.const == 0 and all(c % q.const == 0 for _, c in p.terms):
                return Dim(p.const // q.const, tuple((n, c // q.const) for n, c in p.terms))
    except Unknown:
        pass
    return Dim.symbol(UNSIGNED + name)


def _is_bool(x: Abstract) -> bool:
    return isinstance(x, Cond) or (isinstance(x, Arr) and x.values.dtype == bool)


def _layout(x: Abstract) -> Grid | Cond:
    if isinstance(x, (Grid, Cond)):
        return x
    if isinstance(x, Arr):
        return _as_cond(x) if x.values.dtype == bool else _as_grid(x)
    raise Unknown("a layout change of an additive mask")


def _integral(g: Grid) -> bool:
    return float(g.offset.const).is_integer() and all(float(c).is_integer() for c in g.coefs)


def _constant(arr: np.ndarray) -> Arr:
    if arr.size > _MAX_CONST_ELEMENTS:
        raise Unknown("a large constant tensor")
    if arr.dtype == bool:
        return Arr(arr.copy())
    if not np.issubdtype(arr.dtype, np.number):
        raise Unknown(f"a constant of type {arr.dtype}")
    return Arr(np.vectorize(Dim.of, otypes=[object])(arr) if arr.size else arr.astype(object))


def _cast_arr(x: Arr, to: ir.DataType) -> Arr:
    if to == ir.DataType.BOOL:
        if x.values.dtype == bool:
            return x
        return Arr(np.vectorize(lambda d: _const_of(d) != 0, otypes=[bool])(x.values).astype(bool))
    if x.values.dtype == bool:
        return Arr(np.vectorize(lambda b: Dim(int(b)), otypes=[object])(x.values))
    if to in _INT_TYPES:
        return Arr(np.vectorize(_truncate, otypes=[object])(x.values))
    return x


def _const_of(d: Any) -> Scalar:
    d = Dim.of(d)
    if not d.is_const:
        raise Unknown("a symbolic size used as a boolean")
    return d.const


def _truncate(d: Any) -> Dim:
    d = Dim.of(d)
    if d.is_const:
        return Dim(math.trunc(d.const)) if math.isfinite(d.const) else d
    return d


def _concrete_compare(op: str, a: Arr, b: Arr) -> Arr | None:
    if a.values.dtype == bool or b.values.dtype == bool:
        if a.values.dtype != b.values.dtype or op != "Equal":
            return None
        return Arr(np.equal(a.values, b.values))
    x, y = np.broadcast_arrays(a.values, b.values)
    out = [_decided(op, Dim.of(p), Dim.of(q)) for p, q in zip(x.flat, y.flat, strict=True)]
    if None in out:
        return None
    return Arr(np.array(out, dtype=bool).reshape(x.shape))


def _decided(op: str, p: Dim, q: Dim) -> bool | None:
    """p op q where the sizes' signs decide it (a size such as 2 * B is never -1, torch's "keep
    this dim" in expand), else None."""
    if p.is_const and q.is_const:  # infinities included
        fn = {"Less": np.less, "LessOrEqual": np.less_equal, "Greater": np.greater}
        fn |= {"GreaterOrEqual": np.greater_equal, "Equal": np.equal}
        return bool(fn[op](p.const, q.const))
    low, high = _bounds(p - q)
    holds = {"Equal": (low == high == 0, low > 0 or high < 0), "Less": (high < 0, low >= 0)}
    holds |= {"LessOrEqual": (high <= 0, low > 0), "Greater": (low > 0, high <= 0)}
    holds |= {"GreaterOrEqual": (low >= 0, high < 0)}
    true, false = holds[op]
    return True if true else False if false else None


def _bounds(d: Dim) -> tuple[float, float]:
    """Bounds of d over every value of its symbols: sizes (>= 0), unless a symbol stands for a
    value of unknown sign (UNSIGNED)."""
    if any(n.startswith(UNSIGNED) for n, _ in d.terms):
        return -math.inf, math.inf
    low = d.const if all(c > 0 for _, c in d.terms) else -math.inf
    high = d.const if all(c < 0 for _, c in d.terms) else math.inf
    return low, high


# ---------------------------------------------------------------- deciding a term


@dataclass(frozen=True)
class Term:
    """What a mask term is for every length: 'all' (attends everywhere), 'causal' (key j <= query
    i), 'band' (i - window < j <= i + ahead, without the lower edge when window is None and
    without the upper one when ahead is None; the diagonal always inside), or 'other'."""

    kind: str
    window: int | None = None
    ahead: int | None = None


def classify(algebra: MaskAlgebra, value: ir.Value, additive: bool, square: bool = False) -> Term | None:
    """The term `value` computes at every length; None when it cannot be proven.

    `square`: the attention's query and key lengths are provably equal. The mask's own query
    and key axes must then not be of size 1; they are taken to have the scores' sizes (an
    axis of size 1 at run time against longer scores is an input no exporter's mask expects).
    Without it, causal and band need the mask's two axes to be provably of equal size."""
    try:
        x = algebra.eval(value)
        if additive:
            x = _additive_to_cond(x)
        elif not isinstance(x, Cond) and not (isinstance(x, Arr) and x.values.dtype == bool):
            raise Unknown("a boolean mask that is not a condition")
        return _decide(x, square)
    except Unknown:
        return None


def _additive_to_cond(x: Abstract) -> Arr | Cond:
    """An additive mask as 'may attend': 0 where attended, <= NEG_LIMIT where not."""
    if isinstance(x, Select):
        if x.on_true == 0 and x.on_false <= NEG_LIMIT:
            return x.cond
        if x.on_true == 0 and x.on_false == 0:
            return Cond(x.shape, ("const", True))
        raise Unknown("an additive mask with other values")
    if isinstance(x, Grid) and not any(x.coefs) and x.offset == Dim(0):
        return Cond(x.shape, ("const", True))
    if isinstance(x, Arr) and x.values.dtype != bool:
        values = np.vectorize(_const_of, otypes=[float])(x.values)
        if not np.all((values == 0) | (values <= NEG_LIMIT)):
            raise Unknown("an additive mask with other values")
        return Arr(values == 0)
    raise Unknown("not an additive mask")


def _decide(x: Arr | Cond, square: bool) -> Term:
    if isinstance(x, Arr):
        return _decide_concrete(x.values)
    rank = len(x.shape)
    formula = _map_atoms(x.formula, _settle_one_index)
    atoms = list(_atoms(formula))
    diagonal = _diagonal(atoms, Dim(0))
    shifted = diagonal is None and rank >= 2 and ONE not in x.shape[-2:]
    if shifted:
        # Offsets in the sizes: t = j - i against the bottom-right diagonal t = Sk - Sq of the
        # mask's own [Sq, Sk] axes (a KV cache: queries at positions past .. past + Sq - 1).
        shift = x.shape[-1] - x.shape[-2]
        diagonal = _diagonal(atoms, shift)
        formula = _map_atoms(formula, lambda a: ("atom", a[1], a[2] + shift.scaled(a[1][-1]), a[3]))
    if diagonal is None:
        return Term("other")
    x = Cond(x.shape, formula)
    points = _candidates(diagonal)
    truth = {t: _holds(x.formula, t) for t in points}
    if all(truth.values()):
        return Term("all")
    if rank < 2 or ONE in x.shape[-2:] or (not shifted and x.shape[-1] != x.shape[-2] and not square):
        return Term("other")
    if all(truth[t] == (t <= 0) for t in points):
        return Term("causal")
    return _band(x.formula, points, truth)


def _band(formula: Formula, points: list[int], truth: dict[int, bool]) -> Term:
    """The band low <= t <= high that `formula` holds on, when it is one interval holding the
    diagonal t = 0; an edge past every candidate point is no edge (the candidates reach past
    every threshold)."""
    inside = [t for t in points if truth[t]]
    if not inside or not truth.get(0, False):
        return Term("other")
    low = None if truth[points[0]] else min(inside)
    high = None if truth[points[-1]] else max(inside)
    edges = {e + d for e in (low, high) if e is not None for d in (-1, 0, 1)}

    def in_band(t: int) -> bool:
        return (low is None or low <= t) and (high is None or t <= high)

    if not all(_holds(formula, t) == in_band(t) for t in sorted(set(points) | edges)):
        return Term("other")
    return Term("band", window=None if low is None else 1 - low, ahead=high)


def _diagonal(atoms: list[Formula], shift: Dim) -> list[tuple[Scalar, Scalar]] | None:
    """(coefficient of t, constant) of each atom as a condition on t = j - i - shift; None when an
    atom depends on more than t or its constant is symbolic."""
    out = []
    for _, coefs, offset, _rel in atoms:
        if any(coefs[:-2]):
            return None
        cq, ck = (0, 0, *coefs)[-2:]
        offset = offset + shift.scaled(ck)
        if cq != -ck or not offset.is_const:
            return None
        out.append((ck, offset.const))
    return out


def _settle_one_index(atom: Formula) -> Formula:
    """An atom on the query or the key index alone, constant over all indices >= 0 (key >= 0,
    say), is that constant."""
    _, coefs, offset, rel = atom
    nonzero = [c for c in coefs if c]
    if len(nonzero) != 1 or not offset.is_const:
        return atom
    c = nonzero[0]
    probe = ("atom", (c,), offset, rel)
    points = [x for x in _candidates([(c, offset.const)]) if x >= 0] + [0]
    values = {_holds(probe, x) for x in points}
    return ("const", values.pop()) if len(values) == 1 else atom


def _candidates(diagonal: list[tuple[Scalar, Scalar]]) -> list[int]:
    """Integers t at which every condition is decided: both sides of every threshold, the
    targets' thresholds (0, 1), one point inside each gap and one beyond each end."""
    points = {-1, 0, 1, 2}
    for ck, d in diagonal:
        if ck:
            theta = -d / ck
            base = math.floor(theta)
            points |= {base - 1, base, base + 1, base + 2}
    ordered = sorted(points)
    inner = {p + 1 for p, q in zip(ordered, ordered[1:], strict=False) if q - p > 1}
    return sorted(points | inner | {ordered[0] - 1, ordered[-1] + 1})


def _holds(f: Formula, t: int) -> bool:
    kind = f[0]
    if kind == "const":
        return f[1]
    if kind == "not":
        return not _holds(f[1], t)
    if kind == "and":
        return _holds(f[1], t) and _holds(f[2], t)
    if kind == "or":
        return _holds(f[1], t) or _holds(f[2], t)
    _, coefs, offset, rel = f
    ck = coefs[-1] if coefs else 0
    v = ck * t + offset.const
    return v >= 0 if rel == "ge" else v > 0 if rel == "gt" else v == 0


def _decide_concrete(values: np.ndarray) -> Term:
    """A constant mask: the model accepts only its own size, so checking every element proves it."""
    allowed = values.astype(bool)
    if np.all(allowed):
        return Term("all")
    if values.ndim >= 2 and values.shape[-1] == values.shape[-2]:
        tri = np.tril(np.ones(values.shape[-2:], dtype=bool))
        if np.all(allowed == tri):
            return Term("causal")
    return Term("other")


def mask_constants(value: ir.Value) -> list[int]:
    """Integer constants a mask term computes with (window sizes and the like): a length past
    all of them shows the term at work. Sentinels (|v| >= 2**31) are left out."""
    out: set[int] = set()
    for arr in feeding_constants(value, domains=("", "ai.onnx")):
        if arr.size <= _MAX_CONST_ELEMENTS and np.issubdtype(arr.dtype, np.number):
            finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
            out |= {int(a) for a in finite.reshape(-1) if float(a).is_integer() and 1 < abs(a) < 2**31}
    return sorted(out)
