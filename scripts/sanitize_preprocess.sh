#!/usr/bin/env bash
# ASan + UBSan run of the C++ preprocessing: builds egovlp_deploy._C with -fsanitize=address,undefined
# (CMake option EGOVLP_SANITIZE) into a scratch directory, installs that build there (never into the venv), and runs
# the parity and bad-input tests against it with the ASan runtime preloaded into Python.
#
#   scripts/sanitize_preprocess.sh [SCRATCH_DIR] [extra pytest args...]
#
# SCRATCH_DIR defaults to a new temporary directory; PYTHON defaults to .venv/bin/python. Exit status is pytest's:
# any sanitizer report aborts the test process (halt_on_error), so a clean run is exit 0.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
scratch="${1:-$(mktemp -d -t egovlp-sanitize-XXXXXX)}"
shift || true
mkdir -p "$scratch"

# A separate build dir: the default one (build/{wheel_tag}) belongs to the normal install.
"$python" -m pip install -q --no-deps --no-build-isolation --force-reinstall --upgrade --target "$scratch/site" \
  -C build-dir="$scratch/build" -C cmake.define.EGOVLP_SANITIZE=ON -C cmake.build-type=RelWithDebInfo "$repo"

libasan="$(${CXX:-g++} -print-file-name=libasan.so)"
[[ -f "$libasan" ]] || { echo "libasan.so not found (is the compiler gcc with ASan support?)" >&2; exit 2; }
# libstdc++ is preloaded too: python itself does not link it, and ASan resolves its __cxa_throw interceptor when it
# starts; without this the first C++ exception (every bad-input test) dies in "CHECK failed: real___cxa_throw".
libstdcxx="$(${CXX:-g++} -print-file-name=libstdc++.so)"
reports="$scratch/reports"
rm -rf "$reports" && mkdir -p "$reports"

cd "$repo"
# PYTHONPATH puts the sanitized package ahead of the venv's own copy (a test asserts which one was loaded); pytest
# runs through its console script, since `python -m pytest` would put the source tree (which has no _C) first.
# detect_leaks=0: CPython and torch keep allocations alive until exit by design, which LeakSanitizer would report.
# Reports go to files (log_path): pytest captures stderr, and an aborting process would take it along.
status=0
PYTHONPATH="$scratch/site" LD_PRELOAD="$libasan $libstdcxx" \
ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=1:log_path=$reports/asan" \
UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$reports/ubsan" \
EGOVLP_EXPECT_SANITIZED=1 \
  "$(dirname "$python")/pytest" -q -p no:cacheprovider tests/test_preprocess.py "$@" || status=$?
if compgen -G "$reports/*" > /dev/null; then
  echo "sanitizer reports:" >&2
  cat "$reports"/* >&2
  [[ $status -ne 0 ]] || status=1
else
  echo "no sanitizer reports (in $reports)"
fi
exit $status
