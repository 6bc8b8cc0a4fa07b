"""`egovlp-deploy bench profile` on the CPU (the plumbing: the GPU numbers come from a GPU run)."""

import json

import pytest

from egovlp_deploy.cli import main
from egovlp_deploy.kernels.bench.encoder_profile import category


@pytest.mark.parametrize(
    "name,expected",
    [
        ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64", "GEMM"),
        ("aten::addmm", "GEMM"),
        ("_divided_attention_kernel", "attention"),
        ("_combine_splits_kernel", "attention"),
        ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half, float>", "normalisation"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise"),
        ("aten::native_layer_norm", "normalisation"),
        ("cudaLaunchKernel", "other"),
    ],
)
def test_categories(name, expected):
    assert category(name) == expected


def test_profile_runs_on_the_cpu(tmp_path):
    assert main(["bench", "profile", "--model", "tiny", "--frames", "2", "--iters", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "profile.json").read_text())
    p = result["profile"]
    assert result["meta"]["attention"] == "reference" and p["busy_ms"] is None
    assert p["self_cpu_ms"] > 0 and p["wall_ms"] > 0 and p["launches_per_call"] > 10
    assert sum(c["share"] for c in p["categories"].values()) == pytest.approx(1.0)
    assert {"GEMM", "normalisation"} <= set(p["categories"])
    assert p["kernels"][0]["ms"] >= p["kernels"][-1]["ms"]
    assert "| category |" in (tmp_path / "profile.md").read_text()
    assert (tmp_path / "profile.png").stat().st_size > 1000
