"""AOTInductor on the CPU: every role it builds, from the tiny model, with the O0 wrapper (a package compile costs
tens of seconds on the 2-core machines)."""

import json
import sys

import pytest
import torch

from egovlp_deploy.export.aoti import AotiExport, AotiLoadError, check_loads_in_child, export_aoti, load_aoti
from egovlp_deploy.export.runner import ExportOptions
from egovlp_deploy.export.specs import AOTI_ROLES
from egovlp_deploy.export.validate import validate_artifact, validation_sizes


@pytest.mark.parametrize("role", AOTI_ROLES)
def test_cpu_package_builds_loads_and_matches(tiny_model, tmp_path, role):
    made = export_aoti(tiny_model, role, tmp_path / f"{role}.pt2", max_batch=8, max_text_len=32, wrapper_opt_level="O0")
    check = validate_artifact(tiny_model, role, load_aoti(made.path, role), "fp32", validation_sizes(8, 32))
    assert check.passed, check.failures
    if role == AOTI_ROLES[0]:  # one child interpreter is enough to show a good package passes the fresh-process load
        assert check_loads_in_child(made.path) > 0


def test_a_package_the_loader_rejects_is_a_named_error(tmp_path):
    bad = tmp_path / "video_encoder.pt2"
    bad.write_bytes(b"PK\x03\x04 not really a package")
    with pytest.raises(AotiLoadError, match=r"video_encoder.pt2: torch .* failed in a fresh process \(exit 1\)"):
        check_loads_in_child(bad)


def test_a_loader_that_crashes_or_hangs_is_a_named_error(tmp_path):
    """What the H100 showed (torch 2.11.0+cu130): SIGSEGV in the loader, or no return. Stand-in children do both."""
    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    with pytest.raises(AotiLoadError, match="died with SIGSEGV in a fresh process"):
        check_loads_in_child(tmp_path / "v.pt2", command=crash)
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(AotiLoadError, match="did not return within 1 s"):
        check_loads_in_child(tmp_path / "v.pt2", timeout_s=1, command=hang)


def test_an_unloadable_cuda_package_fails_the_export_and_keeps_the_rest(tmp_path, monkeypatch):
    """The export records the loader's failure, skips that package, writes the ONNX artifacts' manifest and exits 1.
    The CUDA build and the child load are stand-ins (no GPU here); the ONNX export is real."""
    from egovlp_deploy.cli import main
    from egovlp_deploy.export import aoti

    def fake_build(model, role, path, **kw):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"built")
        return AotiExport(role, path, "cuda", "fp32", 1.0)

    def fake_child_load(path, timeout_s=180.0, command=None):
        raise AotiLoadError(f"{path}: torch X's AOTInductor loader died with SIGSEGV in a fresh process")

    monkeypatch.setattr(aoti, "export_aoti", fake_build)
    monkeypatch.setattr(aoti, "check_loads_in_child", fake_child_load)
    monkeypatch.setattr(ExportOptions, "check_device", lambda self: None)  # stands in for a machine with a GPU
    out = tmp_path / "out"
    code = main(
        [
            "export",
            "--checkpoint",
            "random:tiny",
            "--out",
            str(out),
            "--roles",
            "text_encoder",
            "--format",
            "onnx,aoti",
            "--aoti-device",
            "cuda",
            "--max-text-len",
            "16",
            "--ort-optimize",
            "never",
            "--quiet",
        ]
    )
    assert code == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert [a["format"] for a in manifest["artifacts"]] == ["onnx"]
    assert not manifest["validation"]["passed"]
    assert any("died with SIGSEGV" in e for e in manifest["validation"]["errors"])
    assert "died with SIGSEGV" in (out / "validation.md").read_text()


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
        export_aoti(
            model,
            "text_encoder",
            tmp_path / "t.pt2",
            max_batch=2,
            max_text_len=8,
            precision="fp32",
            wrapper_opt_level="O0",
        )
        assert {p.dtype for p in model.parameters()} == {torch.float64}
        assert (tmp_path / "t.pt2").read_bytes() == b"stub"
    finally:
        tiny_model.float()
