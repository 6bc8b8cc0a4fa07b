# Two commands on a fresh machine: `make test` (and `make demo`, which arrives with the runtime issue).
# Both create .venv, install torch first, then the package with its C++ extension, then run.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# The CPU machines carry a local torch 2.13.0 CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
# On a GPU machine, e.g.: make test TORCH_SPEC='torch==2.11.0'
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,cpu
DEPS_STAMP := $(VENV)/.deps-installed
PKG_STAMP := $(VENV)/.package-installed
SOURCES := $(shell find egovlp_deploy kernels export trainer -type f -not -path '*/__pycache__/*' 2>/dev/null) \
           CMakeLists.txt pyproject.toml

.PHONY: setup test demo clean

setup: $(PKG_STAMP)

$(DEPS_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet "$(TORCH_SPEC)" numpy
	$(PIP) install --quiet "$(TORCH_SPEC)" "scikit-build-core>=0.10" "pybind11>=2.12"
	$(PIP) install --quiet --no-build-isolation "$(TORCH_SPEC)" ".[$(EXTRAS)]"
	touch $@

# Reinstall (not editable) whenever a source changes: tests run against the real wheel layout.
$(PKG_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PIP) install --quiet --no-deps --no-build-isolation --force-reinstall .
	touch $@

test: setup
	$(VENV)/bin/pytest -q

# The one-command tour: synthetic data -> short training -> ONNX export -> index/search/MCQ -> latency table,
# everything under demo_out/ (about 4 minutes on a quiet 2-core CPU). DEMO_ARGS=--quick for a plumbing check.
DEMO_OUT ?= demo_out
DEMO_ARGS ?=
demo: setup
	$(VENV)/bin/egovlp-deploy demo --out $(DEMO_OUT) --force $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build dist
