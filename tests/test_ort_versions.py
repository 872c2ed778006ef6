"""The library loads and computes the same in the oldest onnxruntime it supports (1.17).

It asks the runtime for C API version 17 and, through the C++ headers of 1.29, must only
call functions that 1.17 has. A fresh virtual environment with onnxruntime 1.17.3 (from
PyPI) runs a model with our op (with an attn_bias beside a one-element mask: 1.17 crashes on an
empty attn_mask before it, which optimize therefore never writes); the result must equal the
installed onnxruntime's.
"""

from __future__ import annotations

import subprocess
import venv

import numpy as np
import onnx
import onnxruntime as ort

import tfsa_onnx
from tfsa_onnx.opmodel import sparse_attention_model

OLDEST = "1.17.3"
SCRIPT = """
import sys, numpy as np, onnxruntime as ort
so = ort.SessionOptions()
so.register_custom_ops_library(sys.argv[1])
session = ort.InferenceSession(sys.argv[2], so, providers=["CPUExecutionProvider"])
feeds = dict(np.load(sys.argv[3]))
y, density = session.run(None, feeds)
np.savez(sys.argv[4], y=y, density=density, version=ort.__version__)
try:
    session.run(None, {**feeds, "query": feeds["query"][:, :, :, :5]})
except Exception as e:
    print("error:", e)
"""


def test_oldest_supported_onnxruntime_gives_the_same_results(tmp_path):
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    python = env / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, f"onnxruntime=={OLDEST}", "numpy<2"], check=True, timeout=600)

    model = sparse_attention_model(  # with a bias beside a one-element mask, as optimize gives it
        mask_dtype=onnx.TensorProto.BOOL,
        mask_rank=1,
        bias_dtype=onnx.TensorProto.FLOAT,
        is_causal=1,
        block_size=16,
        threshold=0.5,
        max_density=0.5,
        global_tokens=0,
        local_window=0,
        min_seq_len=0,
    )
    model.ir_version = 8  # what onnxruntime 1.17 reads
    model_path, feeds_path, out_path = tmp_path / "op.onnx", tmp_path / "in.npz", tmp_path / "out.npz"
    onnx.save(model, model_path)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((1, 4, 100, 16)).astype(np.float32) for n in ("query", "key", "value")}
    feeds["key"], feeds["value"] = feeds["key"][:, :2], feeds["value"][:, :2]
    feeds["attn_bias"] = rng.standard_normal((1, 4, 1, 100)).astype(np.float32)
    feeds["attn_mask"] = np.ones(1, bool)
    np.savez(feeds_path, **feeds)

    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    args = [
        str(python),
        str(script),
        tfsa_onnx.get_library_path(),
        str(model_path),
        str(feeds_path),
        str(out_path),
    ]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    old = np.load(out_path)
    assert str(old["version"]) == OLDEST
    session = ort.InferenceSession(model.SerializeToString(), tfsa_onnx.session_options())
    y, density = session.run(None, feeds)
    np.testing.assert_array_equal(old["y"], y)
    np.testing.assert_array_equal(old["density"], density)
    # A shape error is an ordinary error status there too, with our message.
    assert "key head_dim (dim 3) must equal query's" in out.stdout
