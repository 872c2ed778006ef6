"""Small attention models saved to disk, with or without external data, for the output tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEQ = 12


def attention_nodes() -> list[onnx.NodeProto]:
    """att = softmax(q k^T * scale) v, from inputs q, k, v and an initializer 'scale'."""
    return [
        helper.make_node("Transpose", ["k"], ["k_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "k_t"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["att"]),
    ]


def attention_model(seed: int = 0, width: int = 16, table_rows: int = 0) -> onnx.ModelProto:
    """softmax(q k^T * scale) v, then a [8, width] weight: one attention site, one big initializer.

    table_rows > 0 adds row 0 of a [table_rows, width] table (bulk for the external data file)."""
    nodes = [*attention_nodes(), helper.make_node("MatMul", ["att", "w"], ["y"])]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, "S", 8]) for n in "qkv"]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, "S", width])
    scale = numpy_helper.from_array(np.array(0.35, np.float32), "scale")
    w = np.random.default_rng(seed).standard_normal((8, width)).astype(np.float32)
    inits = [scale, numpy_helper.from_array(w, "w")]
    if table_rows:
        nodes[-1] = helper.make_node("MatMul", ["att", "w"], ["y0"])
        nodes.append(helper.make_node("Gather", ["table", "row"], ["bias"]))
        nodes.append(helper.make_node("Add", ["y0", "bias"], ["y"]))
        table = np.full((table_rows, width), 0.25 * seed, np.float32)
        inits += [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array(0), "row")]
    graph = helper.make_graph(nodes, "g", io, [out], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def save_model(
    path: Path, data: str | None = None, seed: int = 0, width: int = 16, table_rows: int = 0
) -> Path:
    """Save attention_model() at path; data: the external data file name (None: one file)."""
    model = attention_model(seed, width, table_rows)
    if data is None:
        onnx.save(model, str(path))
    else:
        onnx.save(model, str(path), save_as_external_data=True, size_threshold=0, location=data)
    return path


def feeds() -> dict[str, np.ndarray]:
    x = np.random.default_rng(7).standard_normal((1, 2, SEQ, 8)).astype(np.float32)
    return {"q": x, "k": x[:, :, ::-1].copy(), "v": x * 0.5}


def run(path: Path) -> np.ndarray:
    """The model's output on feeds(), with the operator library registered."""
    import onnxruntime as ort

    import tfsa_onnx

    session = ort.InferenceSession(str(path), tfsa_onnx.session_options(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds())[0]


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def digests(folder: Path) -> dict[str, str]:
    """name -> sha256 of every file (links as 'link -> target') in folder, hidden ones included."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        if p.is_symlink():
            out[key] = f"link -> {p.readlink()}"
        elif p.is_file():
            out[key] = digest(p)
    return out
