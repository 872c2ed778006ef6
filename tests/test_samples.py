"""The samples run: a C++ ONNX Runtime app loads the library and agrees with Python."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import tfsa_onnx
from tfsa_onnx.opmodel import sparse_attention_model

ROOT = Path(__file__).resolve().parents[1]


def _ort_headers() -> Path:
    """Where the build found the ONNX Runtime headers (ORT_INCLUDE_DIR, else the cache)."""
    if os.environ.get("ORT_INCLUDE_DIR"):
        return Path(os.environ["ORT_INCLUDE_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tfsa-onnx" / "ort-headers-1.29.0"


def _fill(shape: tuple[int, ...], index: int) -> np.ndarray:
    """The sample's input pattern: sin(0.1 j + input index)."""
    count = int(np.prod(shape))
    return np.sin(0.1 * np.arange(count, dtype=np.float32) + np.float32(index)).reshape(shape)


def test_cpp_app_runs_the_operator_like_python(tmp_path):
    headers = _ort_headers()
    assert (headers / "onnxruntime_cxx_api.h").is_file(), f"no ONNX Runtime headers in {headers}"
    # The wheel's library is named libonnxruntime.so.1.N.M; its SONAME is libonnxruntime.so.1.
    wheel_runtime = next((Path(ort.__file__).parent / "capi").glob("libonnxruntime.so*"))
    (tmp_path / "lib").mkdir()
    runtime = tmp_path / "lib" / "libonnxruntime.so.1"
    runtime.symlink_to(wheel_runtime)
    exe = tmp_path / "run_model"
    compiler = shutil.which("g++") or shutil.which("c++")
    build = [
        compiler,
        "-std=c++17",
        "-O1",
        str(ROOT / "samples/cpp/run_model.cc"),
        f"-I{headers}",
        str(runtime),
        f"-Wl,-rpath,{runtime.parent}",
        "-o",
        str(exe),
    ]
    subprocess.run(build, check=True, timeout=300)

    model = sparse_attention_model(
        is_causal=1,
        block_size=16,
        threshold=0.5,
        max_density=0.5,
        global_tokens=0,
        local_window=0,
        min_seq_len=0,
    )
    path = tmp_path / "op.onnx"
    onnx.save(model, path)
    shapes = [(1, 4, 96, 32), (1, 2, 96, 32), (1, 2, 96, 32)]
    args = [",".join(map(str, s)) for s in shapes]
    out = subprocess.run(
        [str(exe), str(path), tfsa_onnx.get_library_path(), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    sums = {line.split()[0]: float(line.split()[2]) for line in out.stdout.splitlines()}

    session = ort.InferenceSession(model.SerializeToString(), tfsa_onnx.session_options())
    feeds = {
        name: _fill(s, i) for i, (name, s) in enumerate(zip(("query", "key", "value"), shapes, strict=True))
    }
    y, density = session.run(None, feeds)
    assert abs(sums["Y"] - float(y.astype(np.float64).sum())) < 1e-3
    assert abs(sums["density"] - float(density.sum())) < 1e-5


def test_cpp_app_reports_a_missing_library_as_an_error(tmp_path):
    model = sparse_attention_model()
    path = tmp_path / "op.onnx"
    onnx.save(model, path)
    so = ort.SessionOptions()
    try:
        so.register_custom_ops_library(str(tmp_path / "missing.so"))
    except Exception as e:  # noqa: BLE001 - ORT raises its own error types
        assert "missing.so" in str(e)
    else:
        raise AssertionError("registering a missing library must fail")


def test_python_app_and_sample_configs(exports, tmp_path):
    import sys

    from tfsa_onnx.config import SparsityConfig

    for config in (ROOT / "samples/configs").iterdir():
        SparsityConfig.load(config)  # every shipped config parses and checks
    config = SparsityConfig.load(ROOT / "samples/configs/per_layer.json")
    original = exports.get("bert", "eager")
    model, report = tfsa_onnx.optimize(str(original), config)
    assert [s.replaced for s in report.sites] == [False, True]  # layer 0 skipped by the config
    path = tmp_path / "bert.tfsa.onnx"
    onnx.save(model, path)
    out = subprocess.run(
        [sys.executable, str(ROOT / "samples/python_app.py"), str(path), "--seq-len", "32"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "mean density 1.000" in out.stdout
