"""`info` on a safetensors file whose header is thousands of nested brackets: a named error, not a RecursionError."""

import struct

import pytest

from egovlp_deploy.artifact_info import safetensors_header
from egovlp_deploy.checkpoint import CheckpointError


def _deep(path):
    header = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def test_deeply_nested_header_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="nested too deeply"):
        safetensors_header(_deep(tmp_path / "model.safetensors"))


def test_info_on_a_folder_with_such_weights_exits_2(tmp_path, capsys):
    from egovlp_deploy.cli import main

    _deep(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    assert main(["info", str(tmp_path)]) == 2
    assert "nested too deeply" in capsys.readouterr().err
