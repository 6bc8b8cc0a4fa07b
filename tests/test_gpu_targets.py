"""scripts/gpu_targets.py: the GPU targets read from a gpu_check result folder, on hand-made results whose verdicts
are worked out here."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_targets.py"


@pytest.fixture(scope="module")
def gpu_targets():
    spec = importlib.util.spec_from_file_location("gpu_targets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def e2e_row(stage, backend, p50, k=1):
    return {"stage": stage, "backend": backend, "precision": "fp16", "frames": 16, "k": k, "p50": p50}


def write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_verdicts_from_hand_made_results(gpu_targets, tmp_path):
    write(
        tmp_path / "e2e_base" / "e2e.json",
        {
            "rows": [
                e2e_row("video encode", "torch/reference", 20.0),
                e2e_row("video encode", "torch+graphs", 3.0),  # 6.67x, over 2 ms: missed
                e2e_row("text encode", "torch/reference", 3.0),
                e2e_row("text encode", "torch+graphs", 0.4),  # 7.5x, under 0.5 ms: met
                e2e_row("re-rank cached", "torch/reference", 30.0, k=20),
                {"stage": "failed", "backend": "torch/tuned", "precision": "fp16", "frames": 16, "note": "x"},
            ]
        },
    )
    # the compiled program is the fastest video encoder (a file of its own) and meets both limits
    write(
        tmp_path / "e2e_program_base" / "e2e.json", {"rows": [e2e_row("video encode", "program+compile+graphs", 1.9)]}
    )
    kernels = [
        {"case": "divided core time", "shape": "B=1 F=16 N=196", "backend": b, "ms": ms}
        for b, ms in (("reference", 0.9), ("sdpa", 0.5), ("compile", 0.4), ("triton", 0.25))
    ]  # 3.6x reference, 1.6x compile: met
    kernels += [
        {"case": "cross core text<-video", "shape": "B=1 L=30", "backend": "sdpa", "ms": 0.05},
        {"case": "cross core text<-video", "shape": "B=1 L=30", "backend": "triton", "ms": 0.1},  # 0.5x: behind
        {"case": "cross core video<-text", "shape": "B=8 L=30", "backend": "sdpa", "ms": 0.2},
        {"case": "cross core video<-text", "shape": "B=8 L=30", "backend": "triton", "ms": 0.1},
    ]
    write(tmp_path / "bench_main" / "kernels.json", {"rows": kernels})
    write(
        tmp_path / "precision_validation.json",
        {
            "checks": [
                {"name": "video_encoder/fp16", "metrics": {"worst": {"min_cosine": 0.99995}}},
                {"name": "text_encoder/fp16", "metrics": {"worst": {"min_cosine": 0.99991}}},
                {
                    "name": "task/program-cuda-fp16",
                    "metrics": {
                        "questions": 112,
                        "egomcq_via_head": {m: {"answer_agreement": 1.0} for m in ("dual", "fusion", "ensemble")},
                    },
                },
            ]
        },
    )
    write(tmp_path / "e2e_aoti" / "e2e.json", {"rows": [{"stage": "failed", "backend": "aoti", "note": "Boom: x"}]})

    rows = {r[0]: r for r in gpu_targets.targets(tmp_path)}
    video = rows["base dual video encoder, B = 1, F = 16, runtime"]
    assert video[2] == "1.900 ms (program+compile+graphs), 10.53x eager 20.000 ms" and video[3] == "met"
    assert rows["base text encoder, B = 1, 13 tokens"][3] == "met"
    assert rows["re-rank k = 20 over cached prefixes (base)"][2:] == ["not measured", "-"]  # no fast row at k = 20
    time_pass = rows["divided core, time pass, B = 1, F = 16"]
    assert time_pass[2] == "0.2500 ms: 3.60x reference, 1.60x best" and time_pass[3] == "met"
    cross = rows["cross-attention core, every shape of `bench kernels`"]
    assert (
        cross[2].startswith("1 of 2 shapes behind SDPA; worst 0.50x (cross core text<-video") and cross[3] == "missed"
    )
    precision = rows["fp16 vs fp32 outputs (trained tiny, CUDA programs)"]
    assert precision[2].startswith("min cosine 0.999910; answers agree 1.000/1.000/1.000") and precision[3] == "met"
    assert rows["AOTInductor CUDA package"][2:] == ["no rows: Boom: x", "missed"]
    table = gpu_targets.markdown(gpu_targets.targets(tmp_path))
    assert table.startswith("| what | target | measured | verdict |") and table.count("\n") == 9


def test_an_empty_folder_is_not_measured_everywhere(gpu_targets, tmp_path):
    assert {r[2].split(" (")[0] for r in gpu_targets.targets(tmp_path)} == {"not measured"}
