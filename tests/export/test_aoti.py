"""AOTInductor on the CPU: every role it builds, from the tiny model, with the O0 wrapper (a package compile costs
tens of seconds on the 2-core machines)."""

import pytest
import torch

from egovlp_deploy.export.aoti import export_aoti, load_aoti
from egovlp_deploy.export.specs import AOTI_ROLES
from egovlp_deploy.export.validate import validate_artifact, validation_sizes


@pytest.mark.parametrize("role", AOTI_ROLES)
def test_cpu_package_builds_loads_and_matches(tiny_model, tmp_path, role):
    made = export_aoti(tiny_model, role, tmp_path / f"{role}.pt2", max_batch=8, max_text_len=32,
                       wrapper_opt_level="O0")
    check = validate_artifact(tiny_model, role, load_aoti(made.path, role), "fp32", validation_sizes(8, 32))
    assert check.passed, check.failures


def test_refuses_what_it_does_not_build(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="not 'fusion'"):
        export_aoti(tiny_model, "fusion", tmp_path / "f.pt2", max_batch=4, max_text_len=8)
    with pytest.raises(ValueError, match="CUDA only"):
        export_aoti(tiny_model, "video_encoder", tmp_path / "v.pt2", max_batch=4, max_text_len=8, precision="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA device"):
            export_aoti(tiny_model, "video_encoder", tmp_path / "v.pt2", max_batch=4, max_text_len=8, device="cuda")


def test_the_model_gets_back_its_own_device_and_dtype(tiny_model, tmp_path, monkeypatch):
    """export_aoti converts the model to the package's device/dtype and must restore the ORIGINAL ones afterwards:
    `Module.to` converts parameters in place, so reading them after the conversion (the first GPU run did) restored
    the package's fp16 CUDA instead. Here fp64 -> fp32 plays the same role; the compile itself is stubbed."""
    import torch._inductor

    def fake_package(program, package_path, inductor_configs):
        with open(package_path, "wb") as f:
            f.write(b"stub")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fake_package)
    model = tiny_model.double()
    try:
        export_aoti(model, "text_encoder", tmp_path / "t.pt2", max_batch=2, max_text_len=8, precision="fp32",
                    wrapper_opt_level="O0")
        assert {p.dtype for p in model.parameters()} == {torch.float64}
        assert (tmp_path / "t.pt2").read_bytes() == b"stub"
    finally:
        tiny_model.float()
