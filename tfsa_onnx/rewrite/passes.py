"""The rewrite pass: find attention sites, replace them with ai.tfsa::SparseAttention, report."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

from tfsa_onnx import DOMAIN, GQA_OP_TYPE, OP_TYPE, OP_VERSION
from tfsa_onnx.config import TUNABLE, SparsityConfig, attribute_value
from tfsa_onnx.files import (
    OutputError,
    atomic_write_text,
    check_not_input,
    check_writable,
    data_names,
    same_file,
    write_model,
)
from tfsa_onnx.rewrite.common import (
    Builder,
    GiveUp,
    Inputs,
    Match,
    NotAttention,
    Rule,
    Site,
    dims,
    sparse_attention_node,
    static_int,
)
from tfsa_onnx.rewrite.gqa import GroupQueryAttentionRule
from tfsa_onnx.rewrite.masks import MaskAnalyzer, bias_dtype_fix, mask_dtype_fix
from tfsa_onnx.rewrite.matmul_softmax import MatMulSoftmaxRule
from tfsa_onnx.rewrite.onnx_attention import OnnxAttentionRule
from tfsa_onnx.rewrite.ort_contrib import OrtAttentionRule, OrtMultiHeadAttentionRule
from tfsa_onnx.table import format_table

MIN_OPSET = 13
# Safe defaults: dense below 1,024 keys, a conservative threshold above.
SAFE_DEFAULTS = {"min_seq_len": 1024, "threshold": 0.95, "max_density": 1.0}


class OptimizeError(Exception):
    """The model cannot be optimized; the message is one sentence for the user."""


def _rules() -> list[Rule]:
    return [
        OnnxAttentionRule(),
        OrtAttentionRule(),
        OrtMultiHeadAttentionRule(),
        GroupQueryAttentionRule(),
        MatMulSoftmaxRule(),
    ]


@dataclass
class Report:
    """What the pass found and did: one Site per attention block, in graph order."""

    sites: list[Site] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (node, why it is not attention)
    warnings: list[str] = field(default_factory=list)  # config keys that selected nothing, ...

    @property
    def replaced(self) -> int:
        return sum(s.replaced for s in self.sites)

    def to_list(self) -> list[dict[str, Any]]:
        return [s.as_dict() for s in self.sites]

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_list(), indent=2) + "\n")

    def table(self) -> str:
        """The report as a text table (the same facts as the JSON)."""
        head = (
            "layer",
            "name",
            "family",
            "heads",
            "kv",
            "dim",
            "masked",
            "causal",
            "window",
            "ahead",
            "replaced",
            "reason",
        )
        keys = ("layer", "name", "family", "heads", "kv_heads", "head_dim", "masked", "causal", "window")
        keys += ("window_ahead",)
        rows = [[s.as_dict()[k] for k in (*keys, "replaced", "reason")] for s in self.sites]
        return format_table(head, rows)

    def notes(self) -> list[str]:
        """What the mask analysis kept and why, one line per site and note."""
        return [f"layer {s.layer} ({s.name}): {note}" for s in self.sites for note in s.notes]

    def no_sites_message(self) -> str:
        """Why nothing was found: the sentence, and the anchors that were looked at with the
        reason each is not attention (the first few)."""
        message = "no attention block was found in the model."
        if self.ignored:
            shown = "; ".join(f"{name}: {why}" for name, why in self.ignored[:3])
            more = f" (and {len(self.ignored) - 3} more)" if len(self.ignored) > 3 else ""
            message += f" Not taken as attention: {shown}{more}."
        return message


# ---------------------------------------------------------------- loading / saving


def load_ir(model_or_path: onnx.ModelProto | ir.Model | str | os.PathLike) -> ir.Model:
    """Load a model into the IR; file errors become one-sentence OptimizeErrors."""
    if isinstance(model_or_path, ir.Model):
        model = model_or_path
    elif isinstance(model_or_path, onnx.ModelProto):
        model = ir.serde.deserialize_model(model_or_path)
    else:
        path = Path(model_or_path)
        if not path.is_file():
            raise OptimizeError(f"{path} does not exist or is not a file.")
        try:
            model = ir.load(str(path))
        except Exception as e:  # noqa: BLE001 - protobuf parse errors are not typed
            raise OptimizeError(f"{path} is not a readable ONNX model ({type(e).__name__}).") from None
        if len(model.graph) == 0:
            raise OptimizeError(f"{path} is not a readable ONNX model (it has no graph nodes).")
        _check_external_data(model, path)
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None or opset < MIN_OPSET:
        raise OptimizeError(f"the model uses opset {opset}; tfsa-onnx needs opset {MIN_OPSET} or newer.")
    return model


def _external_tensors(model: ir.Model) -> list[ir.ExternalTensor]:
    """Every tensor of the model kept in external data: initializers and attributes, subgraphs included."""
    tensors: list[Any] = [v.const_value for g in model.graphs() for v in g.initializers.values()]
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for a in node.attributes.values():
            if a.type == ir.AttributeType.TENSOR:
                tensors.append(a.value)
            elif a.type == ir.AttributeType.TENSORS:
                tensors.extend(a.value)
    return [t for t in tensors if isinstance(t, ir.ExternalTensor)]


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Every external data file the model names: inside its folder, present, long enough."""
    sizes: dict[str, int] = {}
    for tensor in _external_tensors(model):
        location = str(tensor.location)
        parts = Path(location).parts
        if Path(location).is_absolute() or ".." in parts or not parts:
            raise OptimizeError(
                f"{path} names external data {location!r}, outside its folder; put the data file "
                "beside the model and name it relative to it."
            )
        data = path.parent / location
        if location not in sizes:
            if not data.is_file():
                raise OptimizeError(
                    f"{data}, external data of {path.name}, is missing; put it beside the model."
                )
            sizes[location] = data.stat().st_size
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if end > sizes[location]:
            raise OptimizeError(
                f"{data} has {sizes[location]} bytes but {path.name} reads up to byte {end} of it; "
                "it is truncated or belongs to another model."
            )


def input_files(model: ir.Model, source: str | os.PathLike | None) -> list[Path]:
    """The files the model reads: its own file and its external data files."""
    if source is None:  # an in-memory model: its tensors know their folder (or are not on disk)
        return sorted({Path(t.path) for t in _external_tensors(model) if t.base_dir})
    folder = Path(source).parent
    return [Path(source), *sorted({folder / str(t.location) for t in _external_tensors(model)})]


def check_outputs(
    model: ir.Model, source: str | os.PathLike | None, outputs: list[str | os.PathLike]
) -> None:
    """Before any work: refuse outputs that are files the input reads, or that cannot be written.

    outputs[0] is the model; its possible data files are checked with it.
    """
    out = Path(outputs[0])
    paths = [out, *(out.with_name(n) for n in data_names(out)), *map(Path, outputs[1:])]
    try:
        check_not_input(paths, input_files(model, source))
        for path in (out, *map(Path, outputs[1:])):
            check_writable(path)
    except OutputError as e:
        raise OptimizeError(str(e)) from None


def save_ir(model: ir.Model, out: str | os.PathLike, source: str | os.PathLike | None = None) -> None:
    """Write graph and external data as one unit (files.write_model); large weights go to external
    data beside OUT (OUT.data or OUT.1.data). Refuses an OUT that is one of the input's files."""
    out = Path(out)
    if source is not None and same_file(out, source):
        raise OptimizeError("the output path is the input path; choose another file with -o.")
    check_outputs(model, source, [out])
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    external = total > 1_800_000_000 or _has_external(model)

    def save(graph: str, data_name: str | None) -> None:
        try:
            ir.save(model, graph, external_data=data_name)
        except (ValueError, OSError) as e:  # reading the input's external data failed
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OptimizeError(f"cannot write {out}: {first}") from None

    try:
        write_model(out, save, external=external, keep=input_files(model, source))
    except OutputError as e:
        raise OptimizeError(str(e)) from None


def _has_external(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


# ---------------------------------------------------------------- the pass


def find_sites(model_or_path: onnx.ModelProto | ir.Model | str | os.PathLike) -> Report:
    """Inspect: the attention sites of a model; nothing is changed or written."""
    model = load_ir(model_or_path)
    if isinstance(model_or_path, ir.Model):
        model = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    return _run(model, None, apply=False)


def optimize(
    model_or_path: onnx.ModelProto | str | os.PathLike,
    config: SparsityConfig | dict | None = None,
    *,
    reapply: bool = False,
) -> tuple[onnx.ModelProto, Report]:
    """Replace every attention block with ai.tfsa::SparseAttention; returns (model, report)."""
    model = load_ir(model_or_path)
    report = optimize_ir(model, config, reapply=reapply)
    for line in report.warnings:
        warnings.warn(line, UserWarning, stacklevel=2)
    return ir.serde.serialize_model(model), report


def optimize_ir(
    model: ir.Model, config: SparsityConfig | dict | None = None, *, reapply: bool = False
) -> Report:
    """optimize() on an IR model, in place (the CLI uses this to keep external data lazy)."""
    if config is None:
        config = SparsityConfig(defaults=dict(SAFE_DEFAULTS))
    elif isinstance(config, dict):
        config = SparsityConfig.from_dict(config)
    report = _run(model, config, apply=True, reapply=reapply)
    if not report.sites:
        raise OptimizeError(report.no_sites_message())
    report.warnings += config.unmatched([(s.layer, s.name) for s in report.sites])
    return report


def _run(model: ir.Model, config: SparsityConfig | None, *, apply: bool, reapply: bool = False) -> Report:
    declared = _declared_types(model.graph)
    _infer_shapes(model)
    graph = model.graph
    report = Report()
    candidates = []
    rules = _rules()
    for node in graph:
        if node.domain == DOMAIN and node.op_type in (OP_TYPE, GQA_OP_TYPE):
            candidates.append((node, None))
            continue
        for rule in rules:
            if rule.is_anchor(node):
                candidates.append((node, rule))
                break
    analyzer = MaskAnalyzer(model)
    for node, rule in candidates:
        site = _existing_site(node) if rule is None else _match(node, rule, report)
        if site is None:
            continue
        site.layer = len(report.sites)
        report.sites.append(site)
        if site.match is not None:
            _resolve_mask(site, analyzer)
        if not apply or config is None:
            continue
        tunables = config.for_site(site.layer, site.name)
        if tunables is not None and (rule is None and reapply or rule is not None and site.match is not None):
            _check_head_thresholds(site, tunables)
        if rule is None:
            if reapply and tunables is not None:
                for key in TUNABLE:
                    if tunables[key] == ():  # an empty list setting: no attribute
                        node.attributes.pop(key, None)
                    else:
                        node.attributes[key] = ir.convenience.convert_attribute(
                            key, attribute_value(tunables[key])
                        )
            continue
        if site.match is None:
            continue
        if tunables is None:
            site.reason = "skipped by the config"
            continue
        _replace(graph, site, tunables)
    if apply:
        _cleanup(model)
        _restore_types(model.graph, declared)
    return report


def _check_head_thresholds(site: Site, tunables: dict[str, Any]) -> None:
    """head_thresholds must give one value per query head of the site (the kernel checks it
    again at run time, where the heads are known for sure)."""
    given = tunables.get("head_thresholds") or ()
    if given and site.heads is not None and len(given) != site.heads:
        raise OptimizeError(
            f"the config gives layer {site.layer} ({site.name}) {len(given)} head_thresholds, but it has "
            f"{site.heads} query heads: give one per query head, or none"
        )


def _declared_types(graph: ir.Graph) -> dict[int, tuple]:
    """Types and shapes as the model declared them (inference only helps the matchers)."""
    values = [*graph.inputs, *graph.initializers.values()]
    values += [o for n in graph.all_nodes() for o in n.outputs]
    return {id(v): (v, v.type, v.shape) for v in values}


def _restore_types(graph: ir.Graph, declared: dict[int, tuple]) -> None:
    """Keep the graph's interface and value_info as they were. New values keep what we set,
    with dims inference invented ('unk__3') renamed per value: onnxruntime invents the same
    names for other dims, and a dim left unknown on the custom op's output reads as -1 to
    onnxruntime's constant folding of Shape (the library's shape inference sets -1)."""
    names = {str(d) for _, _, shape in declared.values() if shape is not None for d in shape}
    for value, type_, shape in declared.values():
        value.type = type_
        value.shape = shape
    for out in graph.outputs:
        old = out.meta.get("tfsa_replaces")
        if old is not None:
            out.type, out.shape = old.type, old.shape
            declared[id(out)] = (out, out.type, out.shape)
    for node in graph.all_nodes():
        if node.domain == DOMAIN and node.op_type == OP_TYPE:
            _name_unknown_dims(node, declared, names)
        for out in node.outputs:
            if id(out) in declared or out.shape is None:
                continue
            out.shape = ir.Shape(
                [
                    d if isinstance(d, int) or str(d) in names else f"{out.name}_dim{i}"
                    for i, d in enumerate(out.shape)
                ]
            )


def _name_unknown_dims(node: ir.Node, declared: dict[int, tuple], names: set[str]) -> None:
    """onnxruntime reads a dim the op's inputs leave unknown as a literal -1 on its output
    (and then folds Shape(Y) to -1): name every dim of query and value."""
    for value in (node.inputs[0], node.inputs[2]):
        if value.is_graph_input() or value.is_initializer():
            continue
        if value.dtype is None:
            value.dtype = node.outputs[0].dtype
        if value.dtype is None:
            continue
        known = value.shape if id(value) not in declared else declared[id(value)][2]
        if known is None:
            known = value.shape if value.shape is not None else ir.Shape([None] * 4)
        value.shape = ir.Shape(
            [
                d if isinstance(d, int) or (d is not None and str(d) in names) else f"{value.name}_dim{i}"
                for i, d in enumerate(known)
            ]
        )
        declared.pop(id(value), None)


def _infer_shapes(model: ir.Model) -> None:
    try:
        ShapeInferencePass(strict_mode=False)(model)
    except Exception:  # noqa: BLE001 - matchers still work with unknown shapes, just prove less
        pass
    if any(n.domain not in ("", "ai.onnx", DOMAIN) for n in model.graph):
        _infer_contrib_shapes(model)


# Contrib ops whose first output has the shape of their first input (normalisations, activations):
# standing in for them with Identity lets ONNX's own inference go on past them.
_SAME_SHAPE_CONTRIB = {
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "QuickGelu",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "SimplifiedLayerNormalization",
}


def _infer_contrib_shapes(model: ir.Model) -> None:
    """Graphs with contrib ops (onnxruntime's optimizer, optimum -O1..O4) lose their shapes past
    the first op ONNX's inference does not know. onnxruntime's symbolic shape inference knows
    them; where it fails, ONNX's inference runs with shape-preserving contrib ops replaced by
    Identity. Both run on a copy without the large weights (graph inputs of the same shape
    instead) and only fill shapes the graph lacks."""
    proto = _weightless_proto(model)
    inferred = _symbolic_shapes(proto)
    if inferred is None:
        for node in proto.graph.node:
            if node.domain in ("com.microsoft", "") and node.op_type in _SAME_SHAPE_CONTRIB:
                x, y = node.input[0], node.output[0]
                node.Clear()
                node.op_type = "Identity"
                node.input.append(x)
                node.output.append(y)
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
        except Exception:  # noqa: BLE001 - keep what the first inference found
            return
    found = {v.name: v for v in inferred.graph.value_info}
    for node in model.graph.all_nodes():
        for out in node.outputs:
            info = found.get(out.name)
            if info is None or out.shape is not None or not info.type.tensor_type.HasField("shape"):
                continue
            t = info.type.tensor_type
            out.shape = ir.Shape(
                [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
            )
            if out.dtype is None and t.elem_type:
                out.dtype = ir.DataType(t.elem_type)


def _weightless_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto whose weights over 1 MB are graph inputs of the same type and shape."""
    graph = model.graph
    large = [
        v for v in graph.initializers.values() if v.const_value is not None and v.const_value.nbytes > 1 << 20
    ]
    inputs = list(graph.inputs)
    try:
        for v in large:
            graph.initializers.pop(v.name)
            graph.inputs.append(v)
        return ir.serde.serialize_model(model)
    finally:
        graph.inputs.clear()
        graph.inputs.extend(inputs)
        for v in large:
            graph.register_initializer(v)


def _symbolic_shapes(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return SymbolicShapeInference.infer_shapes(proto, auto_merge=True, guess_output_rank=True)
    except Exception:  # noqa: BLE001 - an op or a pattern it cannot infer
        return None


def _match(node: ir.Node, rule: Rule, report: Report) -> Site | None:
    from tfsa_onnx.rewrite.common import site_name

    name = site_name(node)
    site = Site(name=name, family=rule.family, node=node)
    try:
        site.match = rule.match(node)
    except NotAttention as e:
        report.ignored.append((name, str(e)))
        return None
    except GiveUp as e:
        site.reason = f"not replaced: {e}"
        return site
    _describe(site, site.match)
    return site


def _describe(site: Site, match: Match) -> None:
    from tfsa_onnx.rewrite.common import heads_of

    q = dims(match.query) or [None]
    site.head_dim = match.head_dim or static_int(q[-1])
    site.heads = match.heads or (heads_of(match.query, site.head_dim) if match.query is not None else None)
    if match.kv_heads is None and match.key is not None:
        site.kv_heads = heads_of(match.key, site.head_dim, match.key_perm)
    else:
        site.kv_heads = match.kv_heads
    site.masked = match.mask is not None or match.implied_mask is not None
    site.causal = match.is_causal
    if match.rewrite is not None:
        site.window = _gqa_window(site.node)


def _gqa_window(node: ir.Node) -> int | None:
    """GroupQueryAttention's local_window_size w: each query sees its last w keys (-1: off)."""
    from tfsa_onnx.rewrite.common import attr

    size = attr(node, "local_window_size", -1)
    return size if size is not None and size >= 0 else None


def _existing_site(node: ir.Node) -> Site:
    from tfsa_onnx.rewrite.common import attr, heads_of

    if node.op_type == GQA_OP_TYPE:
        return Site(
            name=node.name or GQA_OP_TYPE,
            family="tfsa",
            heads=attr(node, "num_heads"),
            kv_heads=attr(node, "kv_num_heads"),
            causal=True,
            window=_gqa_window(node),
            replaced=True,
            reason=f"already {GQA_OP_TYPE}",
            node=node,
        )
    q = dims(node.inputs[0]) or [None] * 4
    head_dim = static_int(q[-1])
    return Site(
        name=node.name or "SparseAttention",
        family="tfsa",
        heads=heads_of(node.inputs[0], head_dim),
        kv_heads=heads_of(node.inputs[1], head_dim),
        head_dim=head_dim,
        masked=len(node.inputs) > 3 and node.inputs[3] is not None,
        causal=bool(attr(node, "is_causal", 0)),
        replaced=True,
        reason="already SparseAttention",
        node=node,
    )


def _replace(graph: ir.Graph, site: Site, tunables: dict[str, Any]) -> None:
    """The rewrite step: build the op's inputs, the op and what its output must become."""
    match = site.match
    if match.rewrite is not None:
        match.rewrite(graph, tunables)
        site.replaced, site.reason = True, ""
        return
    builder = Builder(graph, match.output.producer(), site.name)
    inputs = match.build_inputs(builder)
    bias = bias_dtype_fix(builder, match.bias(builder), match.element_type()) if match.bias else None
    y = sparse_attention_node(builder, match, inputs, _op_mask(builder, site), tunables, site.name, bias)
    _set_y_type(y, match, inputs)
    result = match.finish(builder, y) if match.finish else y
    if match.finish is None and y.dtype is not None:
        result.shape = match.output.shape
    old = match.output
    was_output = old.is_graph_output()
    old.replace_all_uses_with(result, replace_graph_outputs=True)
    if was_output:  # the graph keeps its output: name, type and shape
        name = old.name
        old.name = f"{name}_replaced"
        result.name = name
        result.meta["tfsa_replaces"] = old
    site.replaced = True
    site.reason = ""


def _op_mask(builder: Builder, site: Site) -> ir.Value | None:
    """The op's mask input: what the analysis kept of the graph's mask (scaled as the graph
    scales it, in the query's type), or the mask the block implies."""
    match = site.match
    if match.implied_mask is not None:
        return match.implied_mask(builder)
    mask = site.mask_split.build(builder) if site.mask_split is not None else None
    if mask is None:
        return None
    if match.mask_additive and match.mask_scale != 1.0:
        # softmax(s * (qk + m)): the op adds the mask after scaling, so pre-scale it.
        factor = np.asarray(match.mask_scale, dtype=(mask.dtype or ir.DataType.FLOAT).numpy())
        mask = builder.op("Mul", [mask, builder.const(factor, "mask_scale")])
    return mask_dtype_fix(builder, mask, match.element_type())


def _resolve_mask(site: Site, analyzer: MaskAnalyzer) -> None:
    """Prove the causal and all-true terms of the mask (is_causal, dropped); nothing is built."""
    match = site.match
    if match.mask is not None:
        square = analyzer.same_length(match.query, match.key, match.length_axes)
        split = analyzer.split(match.mask, match.mask_additive, square)
        match.is_causal = match.is_causal or split.causal
        match.sliding_window = split.window
        match.window_ahead = None if match.is_causal else split.ahead
        site.mask_split = split
        site.window = split.window
        site.window_ahead = match.window_ahead
        site.notes = list(split.notes)
        site.mask_constants = list(split.constants)
    site.causal = match.is_causal
    kept = site.mask_split is not None and site.mask_split.kept is not None
    site.masked = kept or match.implied_mask is not None
    if match.bias is not None:
        site.notes.append("score bias (relative positions or ALiBi) passed as attn_bias")


def _set_y_type(y: ir.Value, match: Match, inputs: Inputs) -> None:
    """Shape inference does not know the custom op: give Y [B, Hq, Sq, Dv] explicitly."""
    y.dtype = match.element_type()
    if y.dtype is None:
        return
    q, v = dims(inputs.query), dims(inputs.value)
    if match.finish is None and match.output.shape is not None:
        y.shape = match.output.shape
    elif q is not None and v is not None and len(q) == 4 and len(v) == 4:
        y.shape = ir.Shape([*inputs.query.shape[:3], inputs.value.shape[3]])


def _cleanup(model: ir.Model) -> None:
    RemoveUnusedNodesPass()(model)
    used = {n.domain for n in model.graph.all_nodes()}
    if DOMAIN in used:
        model.opset_imports[DOMAIN] = OP_VERSION
    for domain in used - set(model.opset_imports) - {"", "ai.onnx"}:
        # onnxruntime's optimizer leaves com.microsoft unimported; the checker requires it.
        model.opset_imports[domain] = 1
    # Shape inference filled every intermediate value's shape; keep them (harmless) but make
    # sure no initializer is left unused.
    graph = model.graph
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            del graph.initializers[name]
