"""One tiny export shared by the export tests: the five roles in fp32, fp16 and int8 through the CLI (the slow
part, ~1.5 min on 2 loaded cores), validated and listed in a manifest. Tests that corrupt files copy it first."""

import shutil

import pytest

from official_format import saved_random_tiny


@pytest.fixture(scope="session")
def tiny_trained_like(tmp_path_factory):
    """A tiny model with every weight random and non-zero gates (so cross-attention matters), saved to disk."""
    return saved_random_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", seed=7)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_trained_like):
    from egovlp_deploy.cli import main

    ckpt, model = tiny_trained_like
    out = tmp_path_factory.mktemp("export") / "tiny"
    code = main(
        [
            "export",
            "--checkpoint",
            str(ckpt),
            "--out",
            str(out),
            "--precision",
            "fp32,fp16,int8",
            "--max-batch",
            "8",
            "--max-text-len",
            "32",
            "--quiet",
        ]
    )
    return out, model, code


@pytest.fixture
def export_copy(tiny_export, tmp_path):
    out, model, _ = tiny_export
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst
