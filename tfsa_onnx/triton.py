"""Triton Inference Server model repositories for optimized models (onnxruntime backend).

    from tfsa_onnx.triton import write_triton_repository
    write_triton_repository("model.tfsa.onnx", "repo", "bert_sparse", max_batch=8)

writes repo/bert_sparse/config.pbtxt, repo/bert_sparse/libtfsa_ops.so (libtfsa_ops_cuda.so for
GPU instances when the CUDA build is installed) and repo/bert_sparse/1/model.onnx. A model with
external data goes in as the folder 1/model.onnx/ holding model.onnx and its data files, Triton's
layout for multi-file ONNX models.

Where the library is named: Triton's onnxruntime backend passes each
`model_operations { op_library_filename }` string unchanged to OrtApi::RegisterCustomOpsLibrary,
which dlopen()s it (onnxruntime_backend src/onnxruntime.cc, ModelState::LoadModel). Nothing
resolves it against the model's folder: a relative path is taken from tritonserver's working
directory and a bare file name is searched along LD_LIBRARY_PATH. So the config holds the
absolute path the library will have inside the serving container: LIBRARY_DIR/libtfsa_ops.so,
LIBRARY_DIR defaulting to /models/NAME, the copy in this repository mounted at /models.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import onnx
from onnx import TensorProto
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from tfsa_onnx import DOMAIN, OP_TYPE, __version__, get_library_path
from tfsa_onnx.files import OutputError, check_writable, write_folder

MOUNT = "/models"  # where the docs' `docker run -v REPO:/models` puts the repository
CUDA_LIBRARY = "libtfsa_ops_cuda.so"  # the CUDA build (CMake target tfsa_ops_cuda), when installed
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_TRITON_TYPES = {
    TensorProto.FLOAT: "TYPE_FP32",
    TensorProto.FLOAT16: "TYPE_FP16",
    TensorProto.BFLOAT16: "TYPE_BF16",
    TensorProto.DOUBLE: "TYPE_FP64",
    TensorProto.INT8: "TYPE_INT8",
    TensorProto.INT16: "TYPE_INT16",
    TensorProto.INT32: "TYPE_INT32",
    TensorProto.INT64: "TYPE_INT64",
    TensorProto.UINT8: "TYPE_UINT8",
    TensorProto.UINT16: "TYPE_UINT16",
    TensorProto.UINT32: "TYPE_UINT32",
    TensorProto.UINT64: "TYPE_UINT64",
    TensorProto.BOOL: "TYPE_BOOL",
    TensorProto.STRING: "TYPE_STRING",
}


class TritonRepoError(ValueError):
    """The repository cannot be written; the message is one sentence saying why."""


class TritonRepoWarning(UserWarning):
    """The repository was written but may not be what was meant."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output entry of config.pbtxt."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None  # the model's shape when it differs from dims


def write_triton_repository(
    model_path: str | os.PathLike,
    repo_dir: str | os.PathLike,
    name: str,
    *,
    max_batch: int = 8,
    instance_count: int = 1,
    gpu: bool = False,
    library_dir: str | None = None,
    force: bool = False,
) -> Path:
    """Write REPO_DIR/NAME (config.pbtxt, 1/model.onnx, the operator library) and return it.

    library_dir is the absolute folder the library has inside the serving container (default
    /models/NAME). Everything is checked before anything is written; the folder is built as
    REPO_DIR/.NAME.PID.*.tmp and renamed into place. force replaces a non-empty REPO_DIR/NAME.
    """
    _check_settings(name, max_batch, instance_count)
    library_dir = _library_dir(library_dir, name)
    source = Path(model_path)
    model = _load(source)
    inputs, outputs = tensor_specs(model, max_batch)
    data_files = _external_data_files(model, source)
    library = _library(gpu)
    target = Path(repo_dir) / name
    _check_target(target, source, force)
    try:
        check_writable(target, folder=True)
    except OutputError as e:
        raise TritonRepoError(str(e)) from None
    if count_sparse_attention(model) == 0:
        _warn(
            f"{source} has no {DOMAIN}::{OP_TYPE} node (was it optimized with 'tfsa-onnx optimize'?); "
            "the repository is written anyway and serves the model as it is."
        )
    elif gpu and library.name != CUDA_LIBRARY:
        _warn(
            f"this installation has no CUDA build of the library ({CUDA_LIBRARY}), so on GPU instances "
            f"ONNX Runtime runs the {OP_TYPE} nodes on the CPU, copying their tensors to and from the host."
        )
    config = triton_config(
        name,
        inputs,
        outputs,
        max_batch=max_batch,
        instance_count=instance_count,
        gpu=gpu,
        library_path=str(PurePosixPath(library_dir) / library.name),
    )
    try:
        write_folder(target, lambda tmp: _fill(tmp, source, data_files, library, config))
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        reason = e.strerror or str(e) or type(e).__name__
        raise TritonRepoError(f"writing {target} failed: {reason}{where}; nothing was changed.") from None
    return target


# ---------------------------------------------------------------- checks


def _check_settings(name: str, max_batch: int, instance_count: int) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise TritonRepoError(
            f"model name {name!r} is not valid; use letters, digits, '_', '-' and '.', "
            "starting with a letter, digit or '_'."
        )
    if max_batch < 0:
        raise TritonRepoError(f"max_batch must be 0 (no batching) or more, not {max_batch}.")
    if instance_count < 1:
        raise TritonRepoError(f"instance_count must be at least 1, not {instance_count}.")


def _library_dir(library_dir: str | None, name: str) -> str:
    if library_dir is None:
        return f"{MOUNT}/{name}"
    if not PurePosixPath(library_dir).is_absolute():
        raise TritonRepoError(
            f"library dir {library_dir!r} is relative, but Triton would look it up from tritonserver's "
            "working directory; give the absolute folder the library has inside the serving container."
        )
    return library_dir


def _load(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise TritonRepoError(f"{path} does not exist or is not a file.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf parse errors are not typed
        raise TritonRepoError(f"{path} is not a readable ONNX model ({type(e).__name__}).") from None
    if not model.graph.node or not model.graph.output:
        raise TritonRepoError(f"{path} is not a readable ONNX model (it has no graph nodes or outputs).")
    return model


def _library(gpu: bool) -> Path:
    """The CPU library, or for GPU instances the CUDA build beside it when there is one."""
    try:
        cpu = Path(get_library_path())
    except FileNotFoundError as e:
        raise TritonRepoError(str(e)) from None
    cuda = cpu.with_name(CUDA_LIBRARY)
    return cuda if gpu and cuda.is_file() else cpu


def _warn(message: str) -> None:
    warnings.warn(message, TritonRepoWarning, stacklevel=3)


def _check_target(target: Path, source: Path, force: bool) -> None:
    if target.parent.exists() and not target.parent.is_dir():
        raise TritonRepoError(f"{target.parent} exists and is not a folder; choose another repository path.")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise TritonRepoError(f"{target} exists and is not a folder; remove it or choose another name.")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not force:
        raise TritonRepoError(f"{target} exists and is not empty; use --force to replace it.")
    if source.resolve().is_relative_to(target.resolve()):
        raise TritonRepoError(
            f"the input model is inside {target}, which --force would delete; move it first."
        )


# ---------------------------------------------------------------- the graph


def tensor_specs(model: onnx.ModelProto, max_batch: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The config entries of the model's inputs (initializers excluded) and outputs."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [_spec(v, max_batch, "input") for v in model.graph.input if v.name not in initializers]
    return inputs, [_spec(v, max_batch, "output") for v in model.graph.output]


def _spec(value: onnx.ValueInfoProto, max_batch: int, role: str) -> TensorSpec:
    shape, data_type = _shape_and_type(value, role)
    where = f"{role} '{value.name}'"
    if max_batch == 0:
        if not shape:
            raise TritonRepoError(f"{where} is a scalar, which Triton serves only in a batching model.")
        return TensorSpec(value.name, data_type, tuple(shape))
    if not shape or shape[0] != -1:
        found = f"a fixed leading dimension of {shape[0]}" if shape else "no dimensions"
        raise TritonRepoError(
            f"{where} has {found}, but with max_batch > 0 Triton adds the batch dimension in front of "
            "every input and output; export the model with a dynamic batch dimension, or use "
            "--max-batch 0 (max_batch=0) to serve it without batching."
        )
    # Triton needs at least one dim: a [batch] tensor is dims [1] reshaped to [] (Triton's convention).
    return TensorSpec(value.name, data_type, tuple(shape[1:]) or (1,), None if shape[1:] else ())


def _shape_and_type(value: onnx.ValueInfoProto, role: str) -> tuple[list[int], str]:
    """(dims with -1 for symbolic or unknown ones, Triton data type) of a tensor value."""
    where = f"{role} '{value.name}'"
    if value.type.WhichOneof("value") != "tensor_type":
        raise TritonRepoError(f"{where} is not a tensor; Triton's onnxruntime backend serves tensors only.")
    tensor = value.type.tensor_type
    data_type = _TRITON_TYPES.get(tensor.elem_type)
    if data_type is None:
        type_name = TensorProto.DataType.Name(tensor.elem_type) if tensor.elem_type else "no element type"
        raise TritonRepoError(f"{where} has {type_name}, which Triton's onnxruntime backend does not serve.")
    if not tensor.HasField("shape"):
        raise TritonRepoError(f"{where} has no declared shape; Triton's config needs at least its rank.")
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    if 0 in shape:
        raise TritonRepoError(f"{where} has a dimension of size 0, which Triton's config cannot express.")
    return shape, data_type


def _subgraphs(nodes) -> Iterator[onnx.GraphProto]:
    for node in nodes:
        for attr in node.attribute:
            for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield graph
                yield from _subgraphs(graph.node)


def _nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node: the main graph, its subgraphs (If, Loop, Scan) and the model's functions."""
    containers = [model.graph, *_subgraphs(model.graph.node), *model.functions]
    for function in model.functions:
        containers.extend(_subgraphs(function.node))
    for container in containers:
        yield from container.node


def count_sparse_attention(model: onnx.ModelProto) -> int:
    """How many ai.tfsa::SparseAttention nodes the model has, subgraphs and functions included."""
    return sum(n.domain == DOMAIN and n.op_type == OP_TYPE for n in _nodes(model))


def _tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    for graph in [model.graph, *_subgraphs(model.graph.node)]:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
    for node in _nodes(model):
        for attr in node.attribute:
            yield from ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)


def _external_data_files(model: onnx.ModelProto, source: Path) -> list[str]:
    """The external data files the model's tensors name, relative to its folder, checked to exist."""
    locations = sorted({ExternalDataInfo(t).location for t in _tensors(model) if uses_external_data(t)})
    for location in locations:
        relative = PurePosixPath(location)
        if relative.is_absolute() or ".." in relative.parts or location in ("", "model.onnx"):
            raise TritonRepoError(
                f"{source} names external data {location!r}, which cannot be copied beside it."
            )
        if not (source.parent / location).is_file():
            raise TritonRepoError(f"{source.parent / location}, external data of {source.name}, is missing.")
    return locations


# ---------------------------------------------------------------- config.pbtxt


def triton_config(
    name: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    *,
    max_batch: int,
    instance_count: int,
    gpu: bool,
    library_path: str,
) -> str:
    """config.pbtxt text (protobuf text format of Triton's ModelConfig)."""
    lines = [
        f"# Written by tfsa-onnx {__version__} (tfsa-onnx triton-repo).",
        f"name: {_quote(name)}",
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch}",
        *_tensor_block("input", inputs),
        *_tensor_block("output", outputs),
    ]
    if max_batch > 0:
        lines.append("dynamic_batching { }")
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    lines += ["instance_group [", f"  {{ count: {instance_count} kind: {kind} }}", "]"]
    lines += [
        "# Triton dlopen()s this path as it is (not relative to this folder): the library's",
        "# absolute path inside the serving container.",
        f"model_operations {{ op_library_filename: {_quote(library_path)} }}",
    ]
    return "\n".join(lines) + "\n"


def _tensor_block(field: str, specs: list[TensorSpec]) -> list[str]:
    entries = []
    for spec in specs:
        entry = [
            f"    name: {_quote(spec.name)}",
            f"    data_type: {spec.data_type}",
            f"    dims: {_ints(spec.dims)}",
        ]
        if spec.reshape is not None:
            entry.append(f"    reshape: {{ shape: {_ints(spec.reshape)} }}")
        entries.append("\n".join(["  {", *entry, "  }"]))
    return [f"{field} [", ",\n".join(entries), "]"] if entries else [f"{field} [ ]"]


def _ints(values: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]" if values else "[ ]"


def _quote(text: str) -> str:
    """A text-format string literal: printable ASCII kept, other UTF-8 bytes as octal escapes."""
    out = []
    for byte in text.encode():
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


# ---------------------------------------------------------------- writing


def _fill(folder: Path, source: Path, data_files: list[str], library: Path, config: str) -> None:
    model_folder = folder / "1" / "model.onnx" if data_files else folder / "1"
    model_folder.mkdir(parents=True)
    shutil.copyfile(source, model_folder / "model.onnx")
    for location in data_files:
        (model_folder / location).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.parent / location, model_folder / location)
    shutil.copy(library, folder / library.name)
    (folder / "config.pbtxt").write_text(config)
