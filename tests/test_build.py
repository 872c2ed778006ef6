"""The build's header lookup: each way it can fail stops it with one sentence saying what to set."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _configure(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Configure custom_ops with an empty header cache and no ORT_INCLUDE_DIR."""
    env = {k: v for k, v in os.environ.items() if k != "ORT_INCLUDE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed to build the operator library"
    command = [cmake, "-S", str(ROOT / "custom_ops"), "-B", str(tmp_path / "build"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def _fake_npm(tmp_path: Path, body: str) -> str:
    npm = tmp_path / "fake-npm"
    npm.write_text("#!/bin/sh\n" + body + "\n")
    npm.chmod(0o755)
    return str(npm)


def test_ort_include_dir_without_headers_is_refused(tmp_path):
    out = _configure(tmp_path, f"-DORT_INCLUDE_DIR={tmp_path}")
    assert out.returncode != 0
    assert "has no onnxruntime_cxx_api.h" in out.stderr


@pytest.mark.parametrize(
    "npm,words",
    [
        ("missing", "npm was not found"),
        ("exit 1", "with npm failed"),
        ("echo not-the-package > com.github.asus4.onnxruntime-0.4.9.tgz", "refusing to use it"),
    ],
    ids=["no-npm", "download-fails", "wrong-checksum"],
)
def test_header_fetch_failures_say_what_to_set(tmp_path, npm, words):
    if npm == "missing":
        # No search path at all, so npm cannot be found; the compiler and make given directly.
        args = [
            "-DCMAKE_FIND_USE_CMAKE_SYSTEM_PATH=OFF",
            "-DCMAKE_FIND_USE_SYSTEM_ENVIRONMENT_PATH=OFF",
            f"-DCMAKE_MAKE_PROGRAM={shutil.which('make')}",
            f"-DCMAKE_CXX_COMPILER={shutil.which('c++')}",
        ]
    else:
        args = [f"-DNPM_EXECUTABLE={_fake_npm(tmp_path, npm)}"]
    out = _configure(tmp_path, *args)
    assert out.returncode != 0
    message = " ".join(out.stderr.split())
    assert words in message and "set ORT_INCLUDE_DIR" in message.replace(
        "Set ORT_INCLUDE_DIR", "set ORT_INCLUDE_DIR"
    )
    assert not (tmp_path / "cache" / "tfsa-onnx" / "ort-headers-1.29.0").exists(), "nothing cached on failure"
