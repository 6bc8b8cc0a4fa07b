# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install the locked versions
# (requirements.lock): torch first, then the build tools, then the package with its C++ extension.
# `make lock` regenerates the lock; `make test-latest` runs the tests on the newest versions pyproject.toml allows.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# The default is the torch the lock was resolved against, as a local CPU wheel where one is provided; an unpinned
# torch would pull a multi-GB CUDA build.
# On a GPU machine, e.g.: make test TORCH_SPEC='torch==2.11.0'. The lock leaves torch to TORCH_SPEC.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,cpu
LOCK := requirements.lock
# The lock was resolved for Linux x86_64 with this torch: every install below is held to it there. With another
# torch (a CUDA build pins its own triton) or on another machine (no decord wheel on aarch64) the versions are
# resolved from pyproject.toml instead; `make test-latest` empties this too.
LOCKED_TORCH := torch==2.13.0
CONSTRAINTS ?= $(if $(and $(filter $(LOCKED_TORCH),$(TORCH_SPEC)),$(filter Linux-x86_64,$(shell uname -s)-$(shell uname -m))),--constraint $(LOCK))
DEPS_STAMP := $(VENV)/.deps-installed
PKG_STAMP := $(VENV)/.package-installed
SOURCES := $(shell find egovlp_deploy kernels export trainer -type f -not -path '*/__pycache__/*' 2>/dev/null) \
           CMakeLists.txt pyproject.toml

.PHONY: setup test format demo lock test-latest clean

setup: $(PKG_STAMP)

# The dependencies: with the lock and the default extras, exactly the lock's list (nothing to resolve, and the
# package itself is built once, below); otherwise resolved from pyproject.toml (held to the lock where it applies).
DEFAULT_EXTRAS := dev,cpu
ifeq ($(CONSTRAINTS)|$(EXTRAS),--constraint $(LOCK)|$(DEFAULT_EXTRAS))
DEPS := --requirement $(LOCK)
else
DEPS := --no-build-isolation ".[$(EXTRAS)]"
endif

$(DEPS_STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(CONSTRAINTS) "$(TORCH_SPEC)" numpy "scikit-build-core>=0.10,<2" "pybind11>=2.12,<4"
	$(PIP) install --quiet $(CONSTRAINTS) "$(TORCH_SPEC)" $(DEPS)
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
	$(VENV)/bin/egovlp-deploy demo --out $(DEMO_OUT) --force $(DEMO_ARGS)

# The lock: every package `make setup` installs (the extras dev and cpu, the build tools), resolved by uv for
# Linux x86_64 and this Python, against the local torch build where PIP_FIND_LINKS points (its dependencies, not
# a CUDA build's); torch itself stays with TORCH_SPEC. Review the diff, then `make test`.
UV_SPEC ?= uv==0.13.9
LOCK_VENV := .venv-lock
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --disable-pip-version-check "$(UV_SPEC)"
	$(LOCK_VENV)/bin/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' > $(LOCK_VENV)/build.in
	echo "$(TORCH_SPEC)" >> $(LOCK_VENV)/build.in
	$(LOCK_VENV)/bin/uv pip compile --quiet pyproject.toml $(LOCK_VENV)/build.in --extra dev --extra cpu \
	    --python $(LOCK_VENV)/bin/python --python-platform x86_64-manylinux_2_28 \
	    $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) --no-emit-package torch \
	    --custom-compile-command "make lock" --output-file $(LOCK)

# The newest versions pyproject.toml allows, in a fresh venv of their own: moving the lock is a tested step.
test-latest:
	rm -rf .venv-latest
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=

clean:
	rm -rf $(VENV) .venv-latest $(LOCK_VENV) build dist
