"""One tiny export shared by the export tests: the five roles in fp32, fp16 and int8 through the CLI (the slow
part, ~1.5 min on 2 loaded cores), validated and listed in a manifest; built once per test run (`built_once`).
Tests that corrupt files copy it first."""

import shutil

import pytest

from official_format import random_tiny
from shared_folders import built_once


@pytest.fixture(scope="session")
def tiny_trained_like(tmp_path_factory):
    """A tiny model with every weight random and non-zero gates (so cross-attention matters), saved to disk."""
    model = random_tiny(seed=7)

    def save(folder):
        model.save_pretrained(folder / "tiny")

    folder, _ = built_once(tmp_path_factory, "tiny-seed7", save)
    return folder / "tiny", model


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_trained_like):
    from egovlp_deploy.cli import main

    ckpt, model = tiny_trained_like

    def export(folder):
        argv = ["export", "--checkpoint", str(ckpt), "--out", str(folder / "tiny"), "--precision", "fp32,fp16,int8"]
        return main([*argv, "--max-batch", "8", "--max-text-len", "32", "--quiet"])

    folder, code = built_once(tmp_path_factory, "tiny-export", export)
    return folder / "tiny", model, code


@pytest.fixture
def export_copy(tiny_export, tmp_path):
    out, model, _ = tiny_export
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst
