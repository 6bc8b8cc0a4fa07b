"""`load_model` (every command's --checkpoint) on the files a user names directly: a folder's `model.safetensors`
stands for its folder; a lone safetensors file, a legacy (pre-zip) torch file and a non-checkpoint get errors that
say what the file is."""

import pytest
import torch

from egovlp_deploy import CheckpointError
from egovlp_deploy.model.factory import load_model
from egovlp_deploy.trainer.training_state import save_checkpoint


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_save_pretrained_weights_file_loads_its_folder(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "model")
    model, info = load_model(tmp_path / "model" / "model.safetensors")
    assert _same_weights(model, tiny_model)
    assert info["kind"] == "pretrained" and info["path"] == str((tmp_path / "model").resolve())
    assert info["sha256"] == load_model(tmp_path / "model")[1]["sha256"]


def test_a_training_checkpoints_weights_file_is_verified_as_its_folder(tiny_model, tmp_path):
    step = save_checkpoint(tmp_path / "run" / "checkpoints", 5, tiny_model, {"step": 5}, {"seed": 0})
    model, info = load_model(step / "model.safetensors")
    assert _same_weights(model, tiny_model) and info["kind"] == "trainer"
    raw = bytearray((step / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (step / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="model.safetensors fails its checksum"):
        load_model(step / "model.safetensors")


def test_a_lone_safetensors_file_says_what_is_missing(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "model")
    lone = tmp_path / "egovlp_tiny.safetensors"
    lone.write_bytes((tmp_path / "model" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="safetensors weights file without its folder"):
        load_model(lone)
    renamed = tmp_path / "egovlp_tiny.pth"  # a safetensors file under a .pth name
    renamed.write_bytes(lone.read_bytes())
    with pytest.raises(CheckpointError, match="safetensors weights file without its folder"):
        load_model(renamed)


def test_a_legacy_torch_file_is_named_as_such(tmp_path):
    legacy = tmp_path / "old.pth"
    torch.save({"state_dict": {"a": torch.zeros(2)}}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy \(pre-1.6, non-zip\) format.*never unpickled"):
        load_model(legacy)


def test_a_file_of_something_else_is_not_a_checkpoint(tmp_path):
    other = tmp_path / "notes.pth"
    other.write_text("hello")
    with pytest.raises(CheckpointError, match="not a torch zip checkpoint"):
        load_model(other)
