"""With a sparse setting the optimized model runs, skips work, and stays close at 1,024 tokens."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import feeds, sessions
from onnx import TensorProto, helper

from tfsa_onnx.rewrite import optimize

SPARSE = {
    "defaults": {
        "threshold": 0.9,
        "max_density": 0.5,
        "min_seq_len": 0,
        "block_size": 64,
        "global_tokens": 64,
        "local_window": 128,
    }
}


def with_density_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Expose each SparseAttention's optional density output as a graph output."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for i, node in enumerate(n for n in model.graph.node if n.op_type == "SparseAttention"):
        node.output.append(f"density_{i}")
        model.graph.output.append(helper.make_tensor_value_info(f"density_{i}", TensorProto.FLOAT, None))
    return model


@pytest.mark.parametrize(
    "case",
    [("bert", "sdpa", True, None), ("gpt2", "eager", False, 17), ("llama", "sdpa", True, None)],
    ids=lambda c: f"{c[0]}-{c[1]}-{'dynamo' if c[2] else 'ts'}",
)
def test_sparse_cosine_1024(exports, case) -> None:
    path = exports.get(*case)
    optimized, report = optimize(path, SPARSE)
    assert report.replaced == 2
    a, b = sessions(onnx.load(str(path)), with_density_outputs(optimized))
    x = feeds(a, 1024, batch=1)
    expected = a.run(None, x)[0].ravel()
    got, *densities = b.run(None, x)
    got = got.ravel()
    cosine = float(expected @ got / np.linalg.norm(expected) / np.linalg.norm(got))
    assert cosine >= 0.99
    assert float(np.mean(densities)) < 0.9, "the sparse setting computed (nearly) everything"
