#!/usr/bin/env bash
# Copies the ONNX Runtime C/C++ API headers (the .h files only, about 1 MB) from the build's
# cache into third_party/ort-headers/, so that they travel with the working tree to a machine
# that cannot download them (git ignores that folder). Run from anywhere; the build cache is
# filled by any earlier build of custom_ops/ (see README, "Installing").
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source_dir="${ORT_HEADERS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tfsa-onnx/ort-headers-1.29.0}"
target="$repo/third_party/ort-headers"

if [[ ! -f "$source_dir/onnxruntime_cxx_api.h" ]]; then
  echo "no ONNX Runtime headers in $source_dir: build custom_ops/ once on this machine (make build)," \
    "or set ORT_HEADERS_CACHE to a folder holding onnxruntime_cxx_api.h" >&2
  exit 1
fi
rm -rf "$target"
mkdir -p "$target"
cp "$source_dir"/*.h "$target"/
echo "staged $(ls "$target" | wc -l) headers ($(du -sh "$target" | cut -f1)) in $target"
