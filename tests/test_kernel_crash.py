"""Bad attributes and shapes in a child process: ONNX Runtime must answer with an error (exit 1)
or a result (exit 0), never crash. A crash is a negative return code (a signal), which an
in-process test could not see; it would take the test run down with it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import tfsa_onnx
from tfsa_onnx.reference import BLOCK_SIZE_MAX, TOKENS_MAX

CHILD = r"""
import json, sys
import numpy as np
import onnxruntime as ort
from onnx import TensorProto
from tfsa_onnx.opmodel import sparse_attention_model

library, attrs, shapes = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
attrs = {name: float(v) if isinstance(v, str) else v for name, v in attrs.items()}  # "nan", "inf"
has_mask = "attn_mask" in shapes
model = sparse_attention_model(TensorProto.FLOAT, TensorProto.FLOAT if has_mask else None,
                               len(shapes.get("attn_mask", [])) or 4, **attrs)
for value_info in model.graph.input:  # any rank: the kernel checks shapes itself
    value_info.type.tensor_type.ClearField("shape")
so = ort.SessionOptions()
so.register_custom_ops_library(library)
so.log_severity_level = 4
try:
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    session.run(None, feeds)
except Exception as error:
    print("ERROR", error)
    sys.exit(1)
print("OK")
"""

SMALL = {"query": [1, 2, 32, 8], "key": [1, 2, 32, 8], "value": [1, 2, 32, 8]}

BAD_ATTRIBUTES = [
    ("block_size", 2**58),
    ("block_size", 2**63 - 1),
    ("block_size", 100_000_000),
    ("block_size", BLOCK_SIZE_MAX + 1),
    ("block_size", 0),
    ("block_size", -(2**63)),
    ("local_window", 2**63 - 1),
    ("local_window", -(2**63) + 1),
    ("global_tokens", 2**63 - 1),
    ("global_tokens", TOKENS_MAX + 1),
    ("min_seq_len", -1),
    ("is_causal", 7),
    ("threshold", "nan"),
    ("threshold", "-inf"),
    ("max_density", "inf"),
    ("max_density", -1.0),
    ("scale", "-inf"),
    ("scale", "nan"),
]


def _cuda_library() -> list[str]:
    try:
        return [tfsa_onnx.get_library_path("cuda")]  # its CPU kernels, the same contract
    except FileNotFoundError:
        return []


def _child(library: str, attrs: dict, shapes: dict) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", CHILD, library, json.dumps(attrs), json.dumps(shapes)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


# Every case with the CPU library; the ones that crashed before with the CUDA library too.
@pytest.mark.parametrize(
    "library,name,value",
    [(tfsa_onnx.get_library_path("cpu"), *case) for case in BAD_ATTRIBUTES]
    + [(library, *case) for library in _cuda_library() for case in BAD_ATTRIBUTES[:3]],
)
def test_bad_attribute_is_an_error_not_a_crash(library, name, value):
    out = _child(library, {name: value}, SMALL)
    assert out.returncode >= 0, f"crashed with signal {-out.returncode}: {out.stderr[-2000:]}"
    assert out.returncode == 1, out.stdout + out.stderr[-2000:]
    assert f"{name} must be" in out.stdout and "got" in out.stdout, out.stdout


@pytest.mark.parametrize("library", [tfsa_onnx.get_library_path("cpu")])
@pytest.mark.parametrize(
    "attrs",
    [
        dict(block_size=BLOCK_SIZE_MAX),
        dict(local_window=TOKENS_MAX, global_tokens=TOKENS_MAX, min_seq_len=TOKENS_MAX),
        dict(block_size=BLOCK_SIZE_MAX, local_window=TOKENS_MAX, threshold=0.0, min_seq_len=0),
    ],
)
def test_attributes_at_their_bounds_run(library, attrs):
    out = _child(library, attrs, SMALL)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]


BAD_SHAPES = [
    ({"query": [1, 2, 32, 8], "key": [1, 2, 32], "value": [1, 2, 32, 8]}, "4-D"),
    ({"query": [1, 2, 32, 8], "key": [1, 0, 32, 8], "value": [1, 0, 32, 8]}, "multiple"),
    ({"query": [1, 2, 32, 8], "key": [1, 2, 32, 8], "value": [1, 2, 31, 8]}, "value"),
    ({**SMALL, "attn_mask": [1, 1, 1, 1, 32]}, "rank"),
    ({**SMALL, "attn_mask": [3, 32]}, "broadcast"),
    ({"query": [1, 2, 32, 8, 1], "key": [1, 2, 32, 8], "value": [1, 2, 32, 8]}, "4-D"),
]


@pytest.mark.parametrize("library", [tfsa_onnx.get_library_path("cpu")])
@pytest.mark.parametrize("shapes,words", BAD_SHAPES, ids=lambda x: str(x) if isinstance(x, str) else None)
def test_bad_shape_is_an_error_not_a_crash(library, shapes, words):
    out = _child(library, dict(block_size=2**20), shapes)
    assert out.returncode >= 0, f"crashed with signal {-out.returncode}: {out.stderr[-2000:]}"
    assert out.returncode == 1 and words in out.stdout, out.stdout + out.stderr[-2000:]
