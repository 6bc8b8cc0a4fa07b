# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install torch, then the build
# tools, then the other dependencies (the versions of requirements.lock where it fits, below), then the package with
# its C++ extension.
# `make lock` regenerates the lock; `make test-latest` runs the tests on the newest versions pyproject.toml allows.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# The default is the torch the lock was resolved against; pip takes its CPU build where one is offered (a local
# wheel in PIP_FIND_LINKS, or PyTorch's CPU index in PIP_EXTRA_INDEX_URL), else PyPI's Linux build, which is the
# CUDA one (multi-GB with its NVIDIA libraries). An unpinned torch would pull the newest CUDA build.
# On a GPU machine, e.g.: make test TORCH_SPEC='torch==2.11.0'. The lock leaves torch to TORCH_SPEC.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,cpu
LOCK := requirements.lock
# The lock was resolved (`make lock`) for Linux x86_64, this Python and the CPU build of torch 2.13.0: an install
# is held to it only where all three hold, as the setup checks once torch is in the venv. Anywhere else the versions
# are resolved from pyproject.toml instead: a CUDA build pins its own triton (not the lock's), another Python needs
# other wheels (the lock's numpy has none for 3.10), and aarch64 has no decord wheel. USE_LOCK=no resolves from
# pyproject.toml everywhere (`make test-latest`).
LOCKED_TORCH := 2.13.0+cpu
LOCKED_PYTHON := 3.11
USE_LOCK ?= auto
LOCK_FITS := import importlib.metadata as m, platform, sys; \
    found = (m.version("torch"), "%d.%d" % sys.version_info[:2], platform.system() + "-" + platform.machine()); \
    print("torch %s, Python %s, %s" % found); \
    sys.exit(found != ("$(LOCKED_TORCH)", "$(LOCKED_PYTHON)", "Linux-x86_64"))
DEPS_STAMP := $(VENV)/.deps-installed
PKG_STAMP := $(VENV)/.package-installed
SOURCES := $(shell find egovlp_deploy kernels export trainer -type f -not -path '*/__pycache__/*' 2>/dev/null) \
           CMakeLists.txt pyproject.toml

.PHONY: setup test format demo lock test-latest clean

setup: $(PKG_STAMP)

# The dependencies: torch first (alone, to see which build TORCH_SPEC gives), then the build tools, then the rest.
# Where the lock fits and the extras are the default ones: exactly the lock's list (nothing to resolve, and the
# package itself is built once, below); otherwise resolved from pyproject.toml (held to the lock where it fits).
DEFAULT_EXTRAS := dev,cpu
BUILD_TOOLS := numpy "scikit-build-core>=0.10,<2" "pybind11>=2.12,<4"
LOCKED_DEPS := $(if $(filter $(DEFAULT_EXTRAS),$(EXTRAS)),--requirement $(LOCK),--no-build-isolation ".[$(EXTRAS)]")

$(DEPS_STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --no-deps "$(TORCH_SPEC)"
	@set -e; \
	if [ "$(USE_LOCK)" != no ] && found=$$($(PY) -c '$(LOCK_FITS)'); then \
	    echo "$$found: installing the locked versions ($(LOCK))"; \
	    set -x; \
	    $(PIP) install --quiet --constraint $(LOCK) "$(TORCH_SPEC)" $(BUILD_TOOLS); \
	    $(PIP) install --quiet --constraint $(LOCK) "$(TORCH_SPEC)" $(LOCKED_DEPS); \
	else \
	    [ "$(USE_LOCK)" = no ] || echo "$$found: $(LOCK) is for torch $(LOCKED_TORCH), Python $(LOCKED_PYTHON)," \
	        "Linux-x86_64; resolving the versions from pyproject.toml"; \
	    set -x; \
	    $(PIP) install --quiet "$(TORCH_SPEC)" $(BUILD_TOOLS); \
	    $(PIP) install --quiet "$(TORCH_SPEC)" --no-build-isolation ".[$(EXTRAS)]"; \
	fi
	touch $@

# Reinstall (not editable) whenever a source changes: tests run against the real wheel layout.
$(PKG_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PIP) install --quiet --no-deps --no-build-isolation --force-reinstall .
	$(PIP) check  # every requirement of the package met: a lock left behind by pyproject.toml stops here
	touch $@

# Lint and format check first (ruff, configured in pyproject.toml; `make format` applies both), then the tests, one
# pytest-xdist worker per core up to 4 (each file's tests stay on one worker, which builds the session fixtures it
# needs); PYTEST_WORKERS= runs them in one process.
PYTEST_WORKERS ?= -n auto --maxprocesses 4 --dist loadfile
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q $(PYTEST_WORKERS) --durations=15

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The one-command tour: synthetic data -> short training -> ONNX export -> index/search/MCQ -> latency table,
# everything under demo_out/ (about 4 minutes on a quiet 2-core CPU). DEMO_ARGS=--quick for a plumbing check.
DEMO_OUT ?= demo_out
DEMO_ARGS ?=
demo: setup
	$(VENV)/bin/egovlp-deploy demo --out "$(DEMO_OUT)" --force $(DEMO_ARGS)

# The lock: every package `make setup` installs (the extras dev and cpu, the build tools), resolved by uv for
# Linux x86_64 and Python $(LOCKED_PYTHON) (what the setup checks), against the local torch build where
# PIP_FIND_LINKS points (its dependencies, not a CUDA build's: set LOCKED_TORCH to that build); torch itself stays
# with TORCH_SPEC. Review the diff, then `make test`.
UV_SPEC ?= uv==0.13.9
LOCK_VENV := .venv-lock
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --disable-pip-version-check "$(UV_SPEC)"
	$(LOCK_VENV)/bin/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' > $(LOCK_VENV)/build.in
	echo "$(TORCH_SPEC)" >> $(LOCK_VENV)/build.in
	$(LOCK_VENV)/bin/uv pip compile --quiet pyproject.toml $(LOCK_VENV)/build.in --extra dev --extra cpu \
	    --python $(LOCK_VENV)/bin/python --python-version $(LOCKED_PYTHON) --python-platform x86_64-manylinux_2_28 \
	    $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) --no-emit-package torch \
	    --custom-compile-command "make lock" --output-file $(LOCK)

# The newest versions pyproject.toml allows, in a fresh venv of their own: moving the lock is a tested step.
test-latest:
	rm -rf .venv-latest
	$(MAKE) test VENV=.venv-latest USE_LOCK=no

clean:
	rm -rf $(VENV) .venv-latest $(LOCK_VENV) build
