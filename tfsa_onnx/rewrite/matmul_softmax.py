"""Unfused attention: MatMul(Q, K^T) -> scale / mask -> Softmax -> MatMul(., V).

Covers what the TorchScript and dynamo exporters emit for eager and SDPA attention
(BERT, ViT, GPT-2, Llama/Qwen2): scale on the scores or sqrt(scale) on Q and K, additive
or Where masks, Cast and Where(IsNaN) around the Softmax, K^T as a 4-D Transpose or as
Reshape(Transpose(Reshape 3-D)), and key/value heads repeated by Unsqueeze-Expand-Reshape.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from tfsa_onnx.rewrite import merged_heads
from tfsa_onnx.rewrite.common import (
    FLOAT_TYPES,
    NEG_LIMIT,
    Builder,
    GiveUp,
    Match,
    NotAttention,
    OpRule,
    attr,
    const_array,
    const_scalar,
    dims,
    feeding_constants,
    fold_repeat,
    producer,
    rank,
    same_dim,
    single_consumer,
    strip_expand,
)
from tfsa_onnx.rewrite.mask_proof import Arr, Dim, MaskAlgebra, Unknown

_SWAP_LAST = [0, 1, 3, 2]


class MatMulSoftmaxRule(OpRule):
    """Anchor: a Softmax over the last axis whose input comes from a 4-D MatMul (or a 3-D one
    on merged batch and heads, merged_heads.py)."""

    family = "matmul-softmax"
    anchor_op = "Softmax"

    def __init__(self) -> None:
        self.algebra = MaskAlgebra()  # shapes, for the merged-heads proofs; one per model

    def match(self, softmax: ir.Node) -> Match:
        r = rank(softmax.outputs[0])
        axis = attr(softmax, "axis", -1)
        if r is not None and axis not in (-1, r - 1):
            raise GiveUp(f"Softmax over axis {axis}, not the key axis")
        try:
            pv, merge_probs = _probs_to_matmul(softmax.outputs[0])
        except GiveUp as e:
            if not (_leads_to_matmul(softmax.inputs[0]) and _feeds_matmul(softmax.outputs[0])):
                raise NotAttention(str(e)) from None
            raise
        scores, post_scale, masks, split, softcap = _scores_chain(softmax.inputs[0])
        qk = producer(scores, "MatMul")
        if qk is None:
            raise NotAttention("the Softmax input does not come from a MatMul")
        q, q_scale = _strip_scalar_mul(qk.inputs[0], self.algebra)
        k_t, k_scale = _strip_scalar_mul(qk.inputs[1], self.algebra)
        # with a cap c: c * tanh(post * qk) = c * tanh(scale * qk / c), scale = post * c
        scale = q_scale * k_scale * post_scale * (softcap or 1.0)
        if split is not None or merge_probs is not None:
            if softcap:
                raise GiveUp("a softcap while batch and heads are merged")
            return self._merged(q, k_t, split, merge_probs, pv, masks, scale)
        for name, v in (("Q", q), ("K^T", k_t), ("V", pv.inputs[1])):
            if rank(v) != 4:
                raise GiveUp(f"{name} is not a 4-D [batch, heads, seq, dim] tensor (rank {rank(v)})")
        masks, biases = _split_terms([t[:3] for t in masks])
        mask, additive, mask_scale = masks[0] if masks else (None, True, 1.0)
        if additive and mask is not None and not mask_scale > 0.0:
            raise GiveUp(f"the scores are scaled by {mask_scale} after the mask is added")
        key, perm = _key_layout(k_t)
        value = pv.inputs[1]
        if perm is None:  # K as the graph has it: fold repeated KV heads (fold both or neither)
            folded_k, folded_v = fold_repeat(key), fold_repeat(value)
            if folded_k is not key and folded_v is not value:
                key, value = folded_k, folded_v
        return Match(
            query=q,
            key=key,
            value=value,
            output=pv.outputs[0],
            scale=scale,
            mask=mask,
            mask_additive=additive,
            mask_scale=mask_scale,
            key_perm=perm,
            length_axes=(2, 2 if perm is None else perm[2]),
            bias=_bias_builder(biases),
            softcap=softcap,
        )

    def _merged(self, q3, k3_t, split, merge_probs, pv, terms, scale) -> Match:
        """Attention on [B*H, S, D] (BLOOM): Q, K, V, output and the merged terms made 4-D."""
        if split is None or merge_probs is None:
            raise GiveUp("batch and heads are merged on one side of the Softmax only")
        heads = merged_heads.prove(self.algebra, q3, k3_t, split, merge_probs, pv)
        masks, biases = _split_terms([t[:3] for t in terms])
        merged = {id(t[0]) for t in terms if t[3]}
        if any(id(m[0]) in merged for m in masks):
            raise GiveUp("a mask is added to the scores while batch and heads are merged")
        mask, additive, mask_scale = masks[0] if masks else (None, True, 1.0)
        if additive and mask is not None and not mask_scale > 0.0:
            raise GiveUp(f"the scores are scaled by {mask_scale} after the mask is added")
        unmerge = []
        for value, _, _ in biases:
            if id(value) in merged:
                merged_heads.check_term(self.algebra, value, heads)
                unmerge.append(merged_heads.unmerge_plan(self.algebra, value, heads, q3))
            else:
                unmerge.append(None)
        return Match(
            query=heads.query,
            key=heads.key,
            value=heads.value,
            output=heads.output,
            finish=None if heads.split_output else merged_heads.merge_output,
            scale=scale,
            mask=mask,
            mask_additive=additive,
            mask_scale=mask_scale,
            bias=_bias_builder(biases, unmerge),
            head_dim=_static_last(self.algebra, heads.query),  # for the report (TorchScript loses it)
        )


def _static_last(algebra: MaskAlgebra, value: ir.Value) -> int | None:
    """The last dim of value where the size algebra proves it a constant."""
    try:
        d = algebra.shape_of(value)[-1]
    except (Unknown, IndexError):
        return None
    return int(d.const) if d.is_const else None


def _probs_to_matmul(probs: ir.Value) -> tuple[ir.Node, ir.Node | None]:
    """Follow the probabilities through Cast / Dropout / Where(IsNaN) to the PV MatMul; also
    the one Reshape that merges batch and heads on the way, if any (merged_heads.py)."""
    value, merge = probs, None
    for _ in range(7):
        users = [n for n, _ in value.uses()]
        if value.is_graph_output():
            raise GiveUp("attention probabilities are a graph output")
        nan_where = _isnan_where(value, users)
        if nan_where is not None:
            value = nan_where.outputs[0]
            continue
        if merge is None and len(users) > 1:  # DeBERTa's TorchScript: the merge reads P's shape
            users = _unless_only_sizing_the_merge(users)
        if len(users) != 1:
            raise GiveUp("attention probabilities have other consumers (e.g. output_attentions)")
        node = users[0]
        if node.op_type == "MatMul" and node.inputs[0] is value:
            return node, merge
        if node.op_type == "Reshape" and node.inputs[0] is value and merge is None:
            merge, value = node, node.outputs[0]
            continue
        if node.op_type in ("Cast", "Identity", "Dropout") and node.inputs[0] is value:
            if node.op_type == "Cast" and node.outputs[0].dtype not in FLOAT_TYPES:
                raise GiveUp("attention probabilities are cast to a non-float type")
            if node.op_type == "Dropout" and len(node.inputs) > 2 and node.inputs[2] is not None:
                if const_scalar(node.inputs[2]) not in (0.0, None):
                    raise GiveUp("Dropout in training mode after the Softmax")
            value = node.outputs[0]
            continue
        raise GiveUp(f"unexpected {node.op_type} between the Softmax and the value MatMul")
    raise GiveUp("no value MatMul after the Softmax")


def _unless_only_sizing_the_merge(users: list[ir.Node]) -> list[ir.Node]:
    """The probabilities' users without their Shape nodes when those only compute the target
    shape of the one other user, a Reshape (probs.view(-1, probs.size(-2), probs.size(-1))):
    they then go with that Reshape, as the rest of the block does. Else `users` as they are."""
    shapes = [n for n in users if n.op_type == "Shape"]
    others = [n for n in users if n.op_type != "Shape"]
    if not shapes or len(others) != 1 or others[0].op_type != "Reshape":
        return users
    reshape = others[0]
    if reshape.inputs[0] is not shapes[0].inputs[0]:
        return users
    return others if all(_only_feeds(n, reshape, 1) for n in shapes) else users


def _only_feeds(node: ir.Node, target: ir.Node, index: int, depth: int = 8) -> bool:
    """Whether every use of node's outputs leads (within `depth` ops) to target.inputs[index]
    and nowhere else (no graph output)."""
    for out in node.outputs:
        if out.is_graph_output():
            return False
        for user, i in out.uses():
            if user is target and i == index:
                continue
            if user is target or depth == 0 or not _only_feeds(user, target, index, depth - 1):
                return False
    return True


def _feeds_matmul(value: ir.Value, depth: int = 4) -> bool:
    """Does the value reach a MatMul's first input within a few ops (attention's PV product)."""
    for node, index in value.uses():
        if node.op_type == "MatMul" and index == 0:
            return True
        if depth > 0 and any(_feeds_matmul(o, depth - 1) for o in node.outputs):
            return True
    return False


def _isnan_where(value: ir.Value, users: list[ir.Node]) -> ir.Node | None:
    """Where(IsNaN(p), 0, p): SDPA's guard for fully masked rows (the op gives zeros there)."""
    if len(users) != 2:
        return None
    isnan = next((n for n in users if n.op_type == "IsNaN"), None)
    where = next((n for n in users if n.op_type == "Where"), None)
    if isnan is None or where is None:
        return None
    cond, fill, data = where.inputs
    if cond is not isnan.outputs[0] or data is not value or const_scalar(fill) != 0.0:
        return None
    if single_consumer(isnan.outputs[0]) is not where:
        return None
    return where


def _scores_chain(value: ir.Value) -> tuple[ir.Value, float, list[tuple], ir.Node | None, float | None]:
    """Walk back from the Softmax input: (QK scores, scale applied after QK, masks, the Reshape
    that splits merged batch and heads, if any, the softcap c of c * tanh(...) or None).

    Each mask is (value, additive, scale applied after it was added, added while merged). With
    a Tanh (Gemma 2's logit softcapping) the scale after it is the cap, and the returned scale
    is the one inside it: scores = c * tanh(scale * qk) + terms.
    """
    scale = 1.0
    masks: list[tuple[ir.Value, bool, float, bool]] = []
    split, softcap = None, None
    for _ in range(14):
        node = producer(value)
        if node is None or node.op_type == "MatMul":
            return value, scale, masks, split, softcap
        if node.op_type in ("Cast", "Identity"):
            if node.inputs[0].dtype not in FLOAT_TYPES:
                raise GiveUp("the scores are cast from a non-float type")
            value = node.inputs[0]
        elif node.op_type in ("Mul", "Div"):
            c, other = _scalar_operand(node)
            if c is None:
                raise GiveUp(f"the scores go through a {node.op_type} by a non-constant")
            if node.op_type == "Div" and c != 0.0:
                c = 1.0 / c
            elif node.op_type == "Div":
                raise GiveUp("the scores are divided by zero")
            scale *= c
            value = other
        elif node.op_type == "Tanh":
            softcap, scale = _softcap(softcap, scale, masks), 1.0
            value = node.inputs[0]
        elif node.op_type == "Reshape" and split is None and _leads_to_matmul(node.inputs[0]):
            split, value = node, node.inputs[0]
        elif node.op_type in ("Add", "Where") and softcap is not None:
            raise GiveUp("a term is added to the scores inside the softcap's Tanh")
        elif node.op_type == "Add":
            a, b = node.inputs
            if _leads_to_matmul(a):
                value, mask = a, b
            elif _leads_to_matmul(b):
                value, mask = b, a
            else:
                raise GiveUp("cannot tell the scores from the mask in an Add before the Softmax")
            masks.append((mask, True, scale, split is not None))
        elif node.op_type == "Where":
            cond, x, y = node.inputs
            if (const_scalar(y) or 0.0) <= NEG_LIMIT and const_scalar(y) is not None:
                masks.append((cond, False, scale, split is not None))
                value = x
            elif (const_scalar(x) or 0.0) <= NEG_LIMIT and const_scalar(x) is not None:
                inverted = producer(_bool_cast_of_bool(cond), "Not")  # masked_fill(~mask, min): DeBERTa
                if inverted is None:
                    raise GiveUp("Where(mask, -inf, scores) with a mask that is not a Not")
                masks.append((inverted.inputs[0], False, scale, split is not None))
                value = y
            else:
                raise GiveUp("a Where before the Softmax that does not fill with a large negative")
        else:
            raise GiveUp(f"unexpected {node.op_type} between the QK MatMul and the Softmax")
    raise GiveUp("no QK MatMul within 14 ops before the Softmax")


def _softcap(softcap: float | None, scale_after: float, masks: list[tuple]) -> float:
    """The cap c of c * tanh(s) from the scale applied after the Tanh; the op caps the raw
    scores only, so every term must be added after the Tanh, and only one Tanh may occur."""
    if softcap is not None:
        raise GiveUp("two Tanh between the QK MatMul and the Softmax")
    if not (math.isfinite(scale_after) and scale_after > 0.0):
        raise GiveUp(f"a Tanh on the scores scaled by {scale_after} after it (not a softcap)")
    return scale_after


def _bool_cast_of_bool(value: ir.Value) -> ir.Value:
    """What a Cast to bool of a bool (a Not's output: TorchScript's DeBERTa) casts: the same
    values. Anything else as it is."""
    cast = producer(value, "Cast")
    if cast is not None and attr(cast, "to") == ir.DataType.BOOL and producer(cast.inputs[0], "Not"):
        return cast.inputs[0]
    return value


def _leads_to_matmul(value: ir.Value, depth: int = 8) -> bool:
    node = producer(value)
    for _ in range(depth):
        if node is None:
            return False
        if node.op_type == "MatMul":
            return True
        if node.op_type in ("Mul", "Div", "Cast", "Identity", "Tanh"):
            nxt = [i for i in node.inputs if const_array(i) is None]
            if len(nxt) != 1:
                return False
            node = producer(nxt[0])
        elif node.op_type == "Add":
            return any(_leads_to_matmul(i, depth - 1) for i in node.inputs)
        elif node.op_type == "Where":  # the scores in either branch (DeBERTa: Where(~mask, min, s))
            return any(_leads_to_matmul(i, depth - 1) for i in node.inputs[1:])
        elif node.op_type == "Reshape":  # merged batch and heads split back (merged_heads.py)
            node = producer(node.inputs[0])
        else:
            return False
    return False


def _scalar_operand(node: ir.Node, algebra: MaskAlgebra | None = None) -> tuple[float | None, ir.Value]:
    """(c, x) of x * c, c * x or x / c with c a one-element constant, or (with `algebra`) a
    number the shapes alone decide; (None, first input) otherwise."""
    a, b = node.inputs
    cb = _known_scalar(b, algebra)
    if cb is not None:
        return cb, a
    if node.op_type == "Mul":
        ca = _known_scalar(a, algebra)
        if ca is not None:
            return ca, b
    return None, a


def _known_scalar(value: ir.Value, algebra: MaskAlgebra | None) -> float | None:
    """A one-element constant, or one computed from static sizes (proven by the algebra)."""
    c = const_scalar(value)
    if c is not None or algebra is None or value.producer() is None:
        return c
    try:
        x = algebra.eval(value)
    except Unknown:
        return None
    if not isinstance(x, Arr) or x.values.size != 1 or x.values.dtype == bool:
        return None
    d = x.values.reshape(-1)[0]
    return float(d.const) if isinstance(d, Dim) and d.is_const else None


def _strip_scalar_mul(value: ir.Value, algebra: MaskAlgebra | None = None) -> tuple[ir.Value, float]:
    """Q or K^T multiplied by sqrt(scale) (SDPA exports), or divided by a scale the sizes give
    (DeBERTa's TorchScript export): the unscaled tensor and the factor."""
    scale = 1.0
    while True:
        node = producer(value, "Mul", "Div")
        if node is None:
            return value, scale
        c, other = _scalar_operand(node, algebra)
        if c is None or c == 0.0:
            return value, scale
        scale *= c if node.op_type == "Mul" else 1.0 / c
        value = other


def _key_layout(k_t: ir.Value) -> tuple[ir.Value, list[int] | None]:
    """K [B,H,S,D] from K^T [B,H,D,S] as (value, perm): K = Transpose(value, perm), or the value
    itself when perm is None. Reuses the exporter's transposes where provable."""
    node = producer(k_t, "Transpose")
    if node is not None and rank(node.inputs[0]) == 4:
        perm = attr(node, "perm")
        composed = [perm[i] for i in _SWAP_LAST]
        return node.inputs[0], (None if composed == [0, 1, 2, 3] else composed)
    k = _reshape_transpose_reshape(k_t)
    if k is not None:
        return k, None
    return k_t, _SWAP_LAST


def _reshape_transpose_reshape(k_t: ir.Value) -> ir.Value | None:
    """Reshape([B,H,D,S]) <- Transpose[0,2,1] <- Reshape([B*H,S,D]) <- K: prove it is K^T."""
    outer = producer(k_t, "Reshape")
    tr = producer(outer.inputs[0], "Transpose") if outer else None
    inner = producer(tr.inputs[0], "Reshape") if tr else None
    if inner is None or attr(tr, "perm") != [0, 2, 1]:
        return None
    k = inner.inputs[0]
    kd, flat, out = dims(k), dims(inner.outputs[0]), dims(k_t)
    if kd is None or flat is None or out is None or len(kd) != 4 or len(flat) != 3:
        return None
    ok = same_dim(flat[1], kd[2]) and same_dim(flat[2], kd[3])
    ok = ok and same_dim(out[0], kd[0]) and same_dim(out[1], kd[1])
    return k if ok else None


def _split_terms(terms: list[tuple[ir.Value, bool, float]]) -> tuple[list, list]:
    """The terms added to the scores as (masks, biases). A boolean term, an additive one that
    computes with a large negative constant ("never attend"), or a graph input (a mask the
    caller feeds) is a mask: the mask analysis may prove it causal or padding, and the kernel
    skips the blocks it closes. Every other additive term (a relative position bias, ALiBi) is
    a bias, passed to the op as it is. Either way each term reaches the scores: the split
    decides how the op reads it, never whether."""
    masks = [t for t in terms if not t[1] or t[0].is_graph_input() or _computes_with_large_negative(t[0])]
    if len(masks) > 1:
        raise GiveUp(f"{len(masks)} masks applied to the scores; only one is supported")
    return masks, [t for t in terms if not any(t is m for m in masks)]


def _computes_with_large_negative(value: ir.Value, limit: int = 300) -> bool:
    """Whether a float constant <= NEG_LIMIT feeds `value` (not through a Shape: sizes only)."""
    constants = feeding_constants(value, limit=limit)
    return any(c.dtype.kind == "f" and c.size and float(np.min(c)) <= NEG_LIMIT for c in constants)


def _bias_builder(biases: list[tuple[ir.Value, bool, float]], unmerge: list | None = None):
    """What builds the op's attn_bias in the rewrite step: the bias terms made 4-D (`unmerge`,
    merged_heads.py), without the Expands the op's broadcast makes unnecessary, pre-scaled
    (softmax(s * (qk + b)): the op adds the bias after scaling) and summed. None: no bias."""
    if not biases:
        return None
    plans = unmerge or [None] * len(biases)

    def build(builder: Builder) -> ir.Value:
        total = None
        for (value, _, scale_after), plan in zip(biases, plans, strict=True):
            term = plan(builder) if plan is not None else strip_expand(value)
            if scale_after != 1.0:
                factor = np.asarray(scale_after, dtype=(term.dtype or ir.DataType.FLOAT).numpy())
                term = builder.op("Mul", [term, builder.const(factor, "bias_scale")])
            total = term if total is None else builder.op("Add", [total, term])
        return total

    return build
