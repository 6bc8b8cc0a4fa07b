#!/usr/bin/env bash
# GPU check, one call on a GPU machine, under 10 minutes (run with timeout_s 600):
#   install the package -> GPU kernel tests (no interpreter) -> AOTInductor CUDA export of the tiny model ->
#   `egovlp-deploy bench kernels` (issue 4) -> end to end at F=16 fp16, batch 1: torch with the Triton kernels,
#   eager PyTorch (reference attention) and AOTInductor CUDA packages, `egovlp-deploy bench e2e` (issue 7) -> $OUT.
# Usage (repository root, CUDA machine, no internet):  OUT=/some/dir bash scripts/gpu_check.sh
# Outputs in $OUT: env.txt, install.log, pytest.log, aoti.log + aoti/, bench.log, bench/kernels.{json,md,png},
# e2e_export.log + e2e_engines/, e2e.log, e2e/e2e.{json,md,png}.
# Each step has its own time limit; the benchmark writes its JSON/markdown after every case, so a cut-short run
# still leaves its rows.
set -uo pipefail
: "${OUT:?set OUT to the output folder}"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
unset TRITON_INTERPRET  # compiled kernels, not the CPU interpreter
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPO=$(pwd)
start=$SECONDS

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
  git -C "$REPO" rev-parse HEAD 2>/dev/null
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# pybind11 + scikit-build-core are there; --no-deps: decord/av are not needed for the kernels.
if ! timeout 180 "$PY" -m pip install -q --no-deps --no-build-isolation . > "$OUT/install.log" 2>&1; then
  timeout 180 "$PY" -m pip install -q --user --no-deps --no-build-isolation . >> "$OUT/install.log" 2>&1 \
    || { echo "install failed:"; tail -30 "$OUT/install.log"; exit 1; }
fi
echo "installed in $((SECONDS - start)) s"

# Everything that imports the package runs from $OUT: `python -m` puts the working directory first on sys.path,
# and the source folder lacks the compiled extension and the mapped subpackages (kernels, export, trainer).
cd "$OUT"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider --rootdir "$REPO" "$REPO/tests/kernels" \
  "$REPO/tests/model/test_attention_backend.py" > "$OUT/pytest.log" 2>&1
tests_rc=$?
echo "tests rc=$tests_rc after $((SECONDS - start)) s"; tail -15 "$OUT/pytest.log"

# AOTInductor CUDA packages of the tiny model's four roles, validated against PyTorch (issue 6); informational:
# its result does not change the exit code of this kernel check.
timeout 120 "$PY" -m egovlp_deploy.cli export --checkpoint random:tiny --format aoti --aoti-device cuda \
  --out "$OUT/aoti" > "$OUT/aoti.log" 2>&1
echo "aoti export rc=$? after $((SECONDS - start)) s"; tail -8 "$OUT/aoti.log"

timeout $((330 - (SECONDS - start))) "$PY" -m egovlp_deploy.cli bench kernels --out "$OUT/bench" \
  > "$OUT/bench.log" 2>&1
bench_rc=$?
echo "bench rc=$bench_rc after $((SECONDS - start)) s"
tail -5 "$OUT/bench.log"

# End to end (issue 7), tiny model at F=16 fp16: the ONNX + AOTInductor CUDA engines, then batch-1 latency of
# torch (auto = the Triton kernels on CUDA) next to torch/reference (plain eager) and aoti. Informational for the
# exit code. Known on the CPU: a bench process that ran AOTInductor CPU packages can abort or hang at interpreter
# exit AFTER writing its results, hence the timeouts.
timeout 150 "$PY" -m egovlp_deploy.cli export --checkpoint random:tiny --frames 16 --format onnx,aoti \
  --aoti-device cuda --precision fp16 --ort-optimize never --out "$OUT/e2e_engines" > "$OUT/e2e_export.log" 2>&1
echo "e2e export rc=$? after $((SECONDS - start)) s"; tail -4 "$OUT/e2e_export.log"
timeout $((570 - (SECONDS - start))) "$PY" -m egovlp_deploy.cli bench e2e --device cuda \
  --engines "$OUT/e2e_engines" --frames 16 --backends torch,aoti --torch-attention auto,reference \
  --precisions fp16 --ks 5,20 --iters 100 --warmup 10 --out "$OUT/e2e" > "$OUT/e2e.log" 2>&1
echo "e2e bench rc=$? after $((SECONDS - start)) s"
grep -E "^\| (video encode|text encode|re-rank cached)" "$OUT/e2e/e2e.md" 2>/dev/null | cut -c1-150
# the table last: the device reply carries the end of the output
grep -E "^\| (divided core|cross core|video encoder)" "$OUT/bench/kernels.md" | grep -E "triton|reference" | cut -c1-150
exit $(( tests_rc != 0 || bench_rc != 0 ))
