"""The GPU inference targets (BENCHMARKS.md), met or missed, read from one scripts/gpu_check.sh result folder.

Usage:  python scripts/gpu_targets.py RESULTS_DIR        (RESULTS_DIR: gpu_check.tgz unpacked)

Reads what the steps wrote: e2e_base/ and e2e_program_base/e2e.json (base model through the runtime, batch 1, F = 16,
fp16), bench_main/ and bench_sweep/kernels.json (kernel times), precision_validation.json (CUDA fp16 programs of
a trained model against torch fp32), e2e_aoti/e2e.json. A missing file leaves its rows "not measured". The eager
reference is the runtime's torch backend with the plain attention math, no CUDA graphs, no compile
(`torch/reference`, from e2e_base); the fastest row it is compared with may come from the program bench, a separate
process of the same gpu_check call on the same machine (the measured column names the row). Prints a markdown
table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _e2e_rows(results: Path) -> list[dict]:
    rows = []
    for name in ("e2e_base", "e2e_program_base"):
        data = _load(results / name / "e2e.json")
        if data:
            rows += [r for r in data["rows"] if "p50" in r and r.get("frames") == 16 and r.get("precision") == "fp16"]
    return rows


def _runtime_target(rows, stage, k, what, limit_ms, min_speedup):
    """The best p50 of `stage` against the eager reference of the same model, with the limit and the speedup asked."""
    rows = [r for r in rows if r["stage"] == stage and r["k"] == k]
    eager = next((r for r in rows if r["backend"] == "torch/reference"), None)
    others = [r for r in rows if r["backend"] != "torch/reference"]
    if not eager or not others:
        return [what, _target(limit_ms, min_speedup), "not measured", "-"]
    best = min(others, key=lambda r: r["p50"])
    speedup = eager["p50"] / best["p50"]
    met = (limit_ms is None or best["p50"] <= limit_ms) and speedup >= min_speedup
    measured = f"{best['p50']:.3f} ms ({best['backend']}), {speedup:.2f}x eager {eager['p50']:.3f} ms"
    return [what, _target(limit_ms, min_speedup), measured, "met" if met else "missed"]


def _target(limit_ms, min_speedup):
    return " ".join(filter(None, [f"<= {limit_ms} ms," if limit_ms else "", f">= {min_speedup}x eager"]))


def _kernel_rows(results: Path) -> list[dict]:
    rows = []
    for name in ("bench_main", "bench_sweep"):
        data = _load(results / name / "kernels.json")
        if data:
            rows += [r for r in data["rows"] if r.get("ms")]
    return rows


def _time_pass_target(rows):
    what, target = "divided core, time pass, B = 1, F = 16", ">= 3x reference, >= 1.3x best(SDPA, compile)"
    case = {
        r["backend"]: r["ms"] for r in rows if r["case"] == "divided core time" and r["shape"].startswith("B=1 F=16 ")
    }
    if "triton" not in case or "reference" not in case:
        return [what, target, "not measured", "-"]
    vs_ref = case["reference"] / case["triton"]
    alternatives = [case[b] for b in ("sdpa", "compile") if b in case]
    vs_best = min(alternatives) / case["triton"] if alternatives else None
    met = vs_ref >= 3 and vs_best is not None and vs_best >= 1.3
    best = f"{vs_best:.2f}x best" if vs_best is not None else "no SDPA/compile row"
    return [what, target, f"{case['triton']:.4f} ms: {vs_ref:.2f}x reference, {best}", "met" if met else "missed"]


def _cross_target(rows):
    what, target = "cross-attention core, every shape of `bench kernels`", ">= SDPA"
    shapes: dict[tuple, dict] = {}
    for r in rows:
        if r["case"].startswith("cross core"):
            shapes.setdefault((r["case"], r["shape"]), {})[r["backend"]] = r["ms"]
    ratios = sorted(
        (times["sdpa"] / times["triton"], case, shape)
        for (case, shape), times in shapes.items()
        if "sdpa" in times and "triton" in times
    )
    if not ratios:
        return [what, target, "not measured", "-"]
    worst, case, shape = ratios[0]
    behind = sum(1 for ratio, _, _ in ratios if ratio < 1)
    measured = f"{behind} of {len(ratios)} shapes behind SDPA; worst {worst:.2f}x ({case}, {shape})"
    return [what, target, measured, "met" if behind == 0 else "missed"]


def _precision_target(results: Path):
    what, target = "fp16 vs fp32 outputs (trained tiny, CUDA programs)", "cosine >= 0.9999, EgoMCQ answers identical"
    data = _load(results / "precision_validation.json")
    if not data:
        return [what, target, "not measured", "-"]
    checks = data["checks"]
    cosines = [c["metrics"]["worst"]["min_cosine"] for c in checks if c["metrics"].get("worst")]
    tasks = next((c["metrics"] for c in checks if c["name"].startswith("task/program-")), None)
    if not cosines or not tasks or "egomcq_via_head" not in tasks:
        return [what, target, "not measured", "-"]
    agreement = {m: tasks["egomcq_via_head"][m]["answer_agreement"] for m in ("dual", "fusion", "ensemble")}
    met = min(cosines) >= 0.9999 and all(a == 1.0 for a in agreement.values())
    measured = (
        f"min cosine {min(cosines):.6f}; answers agree "
        + "/".join(f"{a:.3f}" for a in agreement.values())
        + f" (dual/fusion/ensemble, {tasks['questions']} questions)"
    )
    return [what, target, measured, "met" if met else "missed"]


def _aoti_target(results: Path):
    what, target = "AOTInductor CUDA package", "loads in a fresh process, validates, runs in `bench e2e`"
    data = _load(results / "e2e_aoti" / "e2e.json")
    if not data:
        return [what, target, "not measured (no e2e_aoti results)", "-"]
    runs = [r for r in data["rows"] if r["stage"] == "video encode" and r["backend"].startswith("aoti")]
    if runs:
        return [what, target, ", ".join(f"video encode {r['backend']} {r['p50']:.3f} ms" for r in runs), "met"]
    notes = [r.get("note", "") for r in data["rows"] if r["stage"] in ("failed", "unavailable")]
    return [what, target, "no rows: " + "; ".join(n[:120] for n in notes), "missed"]


def targets(results: Path) -> list[list[str]]:
    e2e, kernels = _e2e_rows(results), _kernel_rows(results)
    return [
        _runtime_target(e2e, "video encode", 1, "base dual video encoder, B = 1, F = 16, runtime", 2.0, 8),
        _runtime_target(e2e, "text encode", 1, "base text encoder, B = 1, 13 tokens", 0.5, 3),
        _runtime_target(e2e, "re-rank cached", 20, "re-rank k = 20 over cached prefixes (base)", None, 2),
        _time_pass_target(kernels),
        _cross_target(kernels),
        _precision_target(results),
        _aoti_target(results),
    ]


def markdown(rows: list[list[str]]) -> str:
    lines = ["| what | target | measured | verdict |", "|---|---|---|---|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python scripts/gpu_targets.py RESULTS_DIR (scripts/gpu_check.sh's results, unpacked)")
    print(markdown(targets(Path(sys.argv[1]))), end="")
