#!/usr/bin/env bash
# Why does a CUDA AOTInductor package of ours not load? Seen on an H100 (torch 2.11.0+cu130, 2026-11-28): the tiny
# video_encoder package builds (93 s), then `aoti_load_package` dies with SIGSEGV in the process that built it and
# hangs (> 45 s, three model states) in a fresh one (BENCHMARKS.md). This gets the native stacks: the package is
# built once, then loaded under cuda-gdb (the image has no gdb) in a fresh process and in the building process; a
# load still running after LOAD_WAIT seconds is interrupted so the stacks of every thread are printed. One more load
# tries run_single_threaded=True. Needs the package installed (`python3 -m pip install --no-deps
# --no-build-isolation .`, as scripts/gpu_check.sh does) and about 5 minutes.
# Usage (repository root, CUDA machine):  OUT=/some/dir bash scripts/aoti_crash_probe.sh   -> $OUT/aoti_probe.tgz
set -uo pipefail
: "${OUT:?set OUT}"
PY=$("${PYTHON:-python3}" -c "import sys; print(sys.executable)")  # a real binary for the debugger
GDB=${GDB:-cuda-gdb}
PROBE=$(cd "$(dirname "$0")" && pwd)/aoti_load_probe.py
WAIT=${LOAD_WAIT:-60}
RESULTS=$(cd "$OUT" && pwd); W=$(mktemp -d /tmp/aoti_probe.XXXXXX)
trap 'tar czf "$RESULTS/aoti_probe.tgz" -C "$W" --exclude="*-cache" --exclude="*.pt2" .' EXIT
cd "$W"  # the probe's packages and logs stay in the scratch folder
export TORCHINDUCTOR_CACHE_DIR="$W/inductor-cache" TRITON_CACHE_DIR="$W/triton-cache"
under_gdb() {  # log name, probe args...: the probe under cuda-gdb, interrupted after $WAIT s, then every stack
  local name=$1; shift
  timeout -k 20 -s INT "$WAIT" "$GDB" -q -batch -ex "set pagination off" -ex "set print thread-events off" -ex run \
    -ex "info threads" -ex "thread apply all bt 30" --args "$PY" -X faulthandler "$PROBE" "$@" > "$W/$name.log" 2>&1
  echo "$name rc=$? after $SECONDS s"
  grep -E "^(fresh|build_load|single):|SIGSEGV|SIGABRT|received signal" "$W/$name.log" | head -5
  grep -E "^#[0-9]+ " "$W/$name.log" | head -25
}
timeout 200 "$PY" -X faulthandler "$PROBE" build "$W/v.pt2" > "$W/build.log" 2>&1
echo "build rc=$? after $SECONDS s"; grep -E "^built|Fatal" "$W/build.log"
[[ -f "$W/v.pt2" ]] || exit 1
under_gdb load_fresh load "$W/v.pt2" fresh
under_gdb load_single load "$W/v.pt2" single
under_gdb build_load build "$W/v2.pt2" load  # the inductor cache makes this build short
