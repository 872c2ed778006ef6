#!/usr/bin/env bash
# Copies pytest and click (pure Python, with what they import; no __pycache__, about 7 MB) from
# this checkout's virtual environment into build/gpu-pylib/, for a GPU machine that cannot
# install packages. scripts/gpu_check.sh puts that folder on PYTHONPATH only when the machine's
# own Python lacks pytest or click.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
target="$repo/build/gpu-pylib"
site="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
packages=(pytest _pytest pluggy iniconfig packaging pygments click)

rm -rf "$target"
mkdir -p "$target"
for name in "${packages[@]}"; do
  if [[ ! -d "$site/$name" ]]; then
    echo "$name is not installed in $site; set PYTHON to an interpreter that has pytest and click" >&2
    exit 1
  fi
  cp -r "$site/$name" "$target/"
  # pytest and pluggy read their own versions from the installed metadata
  cp -r "$site/$name"-*.dist-info "$target/" 2>/dev/null || true
done
cp "$site/py.py" "$target/" 2>/dev/null || true  # pytest's legacy 'py' shim
find "$target" -name __pycache__ -type d -prune -exec rm -rf {} +
echo "staged ${packages[*]} ($(du -sh "$target" | cut -f1)) in $target"
