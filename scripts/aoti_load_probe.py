"""Which state makes loading a CUDA AOTInductor package segfault? (H100, 2026-11-28: `aoti_load_package` crashed
in the export process, right after the build, with the model moved back to CPU fp32.)
  python -X faulthandler aoti_load_probe.py build PKG        build the tiny video_encoder package, no load
  python -X faulthandler aoti_load_probe.py load PKG MODE    MODE: fresh | restored (model to CUDA fp16 and back
                                                             to CPU first) | on_cuda (model left on CUDA fp16) |
                                                             single (fresh, run_single_threaded=True)
  python -X faulthandler aoti_load_probe.py build PKG load   build, then load in the same process
scripts/aoti_crash_probe.sh runs it in a scratch folder. PROBE_DEVICE=cpu checks the script itself."""

import os
import sys
import time

import torch

from egovlp_deploy.export.aoti import export_aoti
from egovlp_deploy.export.specs import example_inputs
from egovlp_deploy.model.factory import load_model

ROLE = "video_encoder"
DEV = os.environ.get("PROBE_DEVICE", "cuda")  # cpu: a plumbing check of this script (fp32)
DT = torch.float16 if DEV == "cuda" else torch.float32
PREC = "fp16" if DEV == "cuda" else "fp32"
what, pkg = sys.argv[1], sys.argv[2]
model, _ = load_model("random:tiny", 16)
t0 = time.perf_counter()
if what == "build":
    made = export_aoti(model, ROLE, pkg, max_batch=8, max_text_len=32, device=DEV, precision=PREC)
    print(f"built {pkg} in {made.seconds:.1f} s", flush=True)
    if len(sys.argv) < 4:
        sys.exit(0)
    print("build_load: loading in the process that built it", flush=True)
mode = sys.argv[3] if what == "load" else "build_load"
if mode in ("restored", "on_cuda"):
    model.to(device=DEV, dtype=DT)
    if mode == "restored":
        model.to(device="cpu", dtype=torch.float32)
print(f"{mode}: loading", flush=True)
runner = torch._inductor.aoti_load_package(pkg, run_single_threaded=(mode == "single"))
print(f"{mode}: loaded in {time.perf_counter() - t0:.1f} s", flush=True)
inputs = example_inputs(model.to(DEV, DT), ROLE, 1, 32, seed=1, dtype=DT, device=DEV)
out = runner(**inputs)
out = out[0] if isinstance(out, (list, tuple)) else out
print(f"{mode}: ran, output {tuple(out.shape)} finite={bool(torch.isfinite(out).all())}", flush=True)
