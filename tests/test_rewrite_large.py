"""A model over 2 GB (weights in external data) is optimized and runs. Slow: writes ~4.4 GB.

pytest -m slow tests/test_rewrite_large.py
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from model_files import attention_nodes
from onnx import TensorProto, helper, numpy_helper

import tfsa_onnx

ROWS = 2_200_000_000 // 32  # a [ROWS, 8] float table: 2.2 GB


def _big_model(path) -> None:
    """Attention plus a 2.2 GB Gather table that exists only in the data file (a >2 GB tensor
    cannot pass through protobuf)."""
    data = path.with_name(path.name + ".data")
    chunk = np.ones((1_000_000, 8), np.float32).tobytes()
    with open(data, "wb") as f:
        for _ in range(ROWS // 1_000_000):
            f.write(chunk)
        f.write(np.ones((ROWS % 1_000_000, 8), np.float32).tobytes())
    table = TensorProto(
        name="table", data_type=TensorProto.FLOAT, dims=[ROWS, 8], data_location=TensorProto.EXTERNAL
    )
    for key, value in (("location", data.name), ("offset", "0"), ("length", str(ROWS * 32))):
        table.external_data.add(key=key, value=value)
    nodes = [
        *attention_nodes(),
        helper.make_node("Gather", ["table", "idx"], ["rows"]),
        helper.make_node("Add", ["att", "rows"], ["y"]),
    ]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, "S", 8]) for n in "qkv"]
    io.append(helper.make_tensor_value_info("idx", TensorProto.INT64, ["S"]))
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, "S", 8])
    scale = numpy_helper.from_array(np.array(0.35, np.float32), "scale")
    graph = helper.make_graph(nodes, "big", io, [out], initializer=[scale, table])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.slow
def test_model_over_2gb_is_optimized_with_external_data_beside_the_output(tmp_path):
    from click.testing import CliRunner

    from tfsa_onnx.cli import main

    source = tmp_path / "big.onnx"
    _big_model(source)
    out = tmp_path / "out" / "big.tfsa.onnx"
    result = CliRunner().invoke(main, ["optimize", str(source), "-o", str(out), "--min-seq-len", "0"])
    assert result.exit_code == 0, result.output
    assert out.with_name("big.tfsa.onnx.data").stat().st_size == ROWS * 32
    session = ort.InferenceSession(str(out), tfsa_onnx.session_options())
    q = np.random.default_rng(0).random((1, 2, 10, 8), dtype=np.float32)
    (y,) = session.run(None, {"q": q, "k": q, "v": q, "idx": np.arange(10)})
    original = ort.InferenceSession(str(source))
    np.testing.assert_allclose(
        y, original.run(None, {"q": q, "k": q, "v": q, "idx": np.arange(10)})[0], atol=1e-5
    )
