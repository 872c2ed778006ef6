#!/usr/bin/env bash
# Builds, tests and benchmarks the CUDA kernel on a GPU machine in one run, from the repo root:
#
#   OUT=/some/dir scripts/gpu_check.sh
#
# Needs nvcc, cmake and a Python with torch (CUDA); the ONNX Runtime headers in
# third_party/ort-headers/ (scripts/stage_ort_headers.sh) or ORT_INCLUDE_DIR; pytest and click
# from the machine or from build/gpu-pylib/ (scripts/stage_gpu_pylib.sh). Each step runs under
# its own timeout and the whole under GPU_CHECK_BUDGET seconds (default 450); a failed step
# does not stop the next. Full logs and the benchmark JSON go to $OUT (default build/gpu-check);
# stdout gets the short version and, last, one status line per step.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo="$PWD"
OUT="${OUT:-$repo/build/gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export ORT_INCLUDE_DIR="${ORT_INCLUDE_DIR:-$repo/third_party/ort-headers}"
BUILD_DIR="${BUILD_DIR:-$repo/build/gpu}"
ARCH="${CUDA_ARCH:-90}"
deadline=$((SECONDS + ${GPU_CHECK_BUDGET:-450}))
statuses=()

# The machine's own pytest and click win; the staged copies fill in when one is missing.
export PYTHONPATH="$repo"
if [[ -d build/gpu-pylib ]] && ! "$PY" -c "import pytest, click" 2>/dev/null; then
  export PYTHONPATH="$repo:$repo/build/gpu-pylib"
fi

# step NAME LIMIT_S CMD...: runs CMD with its output in $OUT/NAME.log, under the smaller of
# LIMIT_S and the time left; records PASS / FAIL (rc) / TIMEOUT / SKIP (no time left).
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((deadline - SECONDS)) start=$SECONDS rc status
  ((limit > left)) && limit=$left
  if ((limit < 15)); then
    rm -f "$OUT/$name.log" # not a previous run's
    statuses+=("$name: SKIP (time budget spent)")
    return 1
  fi
  echo "=== $name (limit ${limit}s): $*"
  # bash -c: timeout runs programs, and the steps are this script's (exported) functions
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=PASS ;;
    124 | 137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAIL (rc $rc)" ;;
  esac
  statuses+=("$name: $status in $((SECONDS - start))s, log $OUT/$name.log")
  return $rc
}

show() { # the last N lines of a step's log on stdout
  [[ -f "$OUT/$1.log" ]] || return 0
  echo "--- $1 (last $2 lines of $OUT/$1.log)"
  tail -n "$2" "$OUT/$1.log"
}

environment() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  nvcc --version | tail -n 2
  cmake --version | head -n 1
  "$PY" - <<'PYTHON'
import importlib, sys, warnings
warnings.simplefilter("ignore")  # version attributes some packages deprecate
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "numpy", "onnx", "onnxruntime", "cupy", "pytest", "click"):
    try:
        module = importlib.import_module(name)
        print(f"{name:12s} {getattr(module, '__version__', '?')}  {module.__file__}")
    except Exception as e:  # noqa: BLE001
        print(f"{name:12s} MISSING ({type(e).__name__}: {e})")
import torch
print("torch.cuda.is_available:", torch.cuda.is_available(), "| torch CUDA", torch.version.cuda)
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
try:
    import onnxruntime
    print("onnxruntime providers:", onnxruntime.get_available_providers())
except ImportError:
    pass
PYTHON
}

build() {
  # Both libraries: tfsa_onnx.get_library_path('cpu') and ('cuda') must find fresh copies.
  cmake -S custom_ops -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DTFSA_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DORT_INCLUDE_DIR="$ORT_INCLUDE_DIR" &&
    cmake --build "$BUILD_DIR" -j "$(nproc)" &&
    for lib in "$BUILD_DIR"/libtfsa_ops*.so; do
      # copy then rename: a process still holding the old file keeps reading a whole one
      cp "$lib" tfsa_onnx/.tmp.so && mv tfsa_onnx/.tmp.so "tfsa_onnx/$(basename "$lib")" || return 1
    done &&
    ls -l tfsa_onnx/libtfsa_ops*.so
}

tests() {
  if [[ ! -f tests/test_cuda.py ]]; then
    echo "tests/test_cuda.py is not in this checkout"
    return 3
  fi
  # test_gqa_cuda.py: SparseGroupQueryAttention's CUDA face against the CPU op (needs onnxruntime)
  "$PY" -m pytest -q -p no:cacheprovider -rfEs tests/test_cuda.py $(ls tests/test_gqa_cuda.py 2>/dev/null)
}

bench() { # bench NAME ARGS...: the GPU kernel benchmark (argparse entry: needs no click)
  local name=$1
  shift
  "$PY" -m tfsa_onnx.bench.cuda --heads 32 --head-dim 128 --repeat 10 --json "$OUT/$name.json" "$@"
}

export -f environment build tests bench
export PY OUT BUILD_DIR ARCH
echo "gpu_check: repo $repo, logs in $OUT, python $PY, budget ${GPU_CHECK_BUDGET:-450}s"
step environment 60 environment
show environment 30

if [[ ! -f "$ORT_INCLUDE_DIR/onnxruntime_cxx_api.h" ]]; then
  echo "no onnxruntime_cxx_api.h in $ORT_INCLUDE_DIR: run scripts/stage_ort_headers.sh and carry third_party/ort-headers"
fi
step build 300 build || show build 25

step tests 150 tests
show tests 25

step bench_cuda 180 bench bench_cuda --seq-len 4096,16384,32768 --max-density 0.1
show bench_cuda 20
step bench_cuda_dense 90 bench bench_cuda_dense --seq-len 4096,16384 --max-density 1
show bench_cuda_dense 12
step bench_cuda_causal 120 bench bench_cuda_causal --seq-len 4096,16384,32768 --max-density 0.1 --causal
show bench_cuda_causal 12

echo "=== gpu_check summary (${SECONDS}s)"
printf '%s\n' "${statuses[@]}" | tee "$OUT/summary.txt"
