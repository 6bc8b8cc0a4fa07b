"""Loaded weights are checked: a training checkpoint against its MANIFEST.json (by every command that loads it),
our other safetensors files against the data digest in their header, and weights that neither covers load with a
warning that says corruption cannot be detected."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from egovlp_deploy import CheckpointError, EgoVLPv2, checkpoint
from egovlp_deploy.cli import main
from egovlp_deploy.trainer.training_state import save_checkpoint


@pytest.fixture
def step_dir(tmp_path, tiny_model):
    return save_checkpoint(tmp_path / "run" / "checkpoints", 5, tiny_model, {"step": 5}, {"seed": 0})


def eval_argv(model, tmp_path):
    return [
        "eval",
        "--model",
        str(model),
        "--egomcq",
        str(tmp_path / "egomcq.json"),
        "--video-root",
        str(tmp_path),
        "--tokenizer",
        str(tmp_path),
    ]


def test_training_checkpoint_with_a_scaled_tensor_is_refused(step_dir, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EgoVLPv2.from_pretrained(step_dir)  # intact: loads, no warning
    weights = load_file(str(step_dir / "model.safetensors"))
    weights["video_model.pos_embed"] = weights["video_model.pos_embed"] * -3
    # rewritten with a fresh (matching) data digest and the same size: only the manifest can tell
    metadata = checkpoint.safetensors_metadata(step_dir / "model.safetensors")  # the same header size
    checkpoint.save_safetensors(weights, step_dir / "model.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match="model.safetensors fails its checksum"):
        EgoVLPv2.from_pretrained(step_dir)
    assert main(eval_argv(step_dir, tmp_path)) == 2  # refused before the questions file is even read
    assert "model.safetensors fails its checksum" in capsys.readouterr().err


def test_training_checkpoint_with_a_missing_file_is_refused(step_dir):
    (step_dir / "run.json").unlink()
    with pytest.raises(CheckpointError, match="run.json is missing"):
        EgoVLPv2.from_pretrained(step_dir)


def test_flipped_byte_in_saved_weights_is_detected(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    assert checkpoint.safetensors_digest(weights) is not None
    raw = bytearray(weights.read_bytes())
    raw[-100] ^= 0x10  # one bit of one weight
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="fails its sha256"):
        EgoVLPv2.from_pretrained(tmp_path / "m")


def test_digest_leaves_the_file_a_plain_safetensors_file(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.float16)}
    checkpoint.save_safetensors(tensors, tmp_path / "t.safetensors", metadata={"format": "egovlp-deploy"})
    plain = load_file(str(tmp_path / "t.safetensors"))  # the library reads it as is
    assert all(torch.equal(plain[k], v) for k, v in tensors.items())
    raw = (tmp_path / "t.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["__metadata__"]["format"] == "egovlp-deploy" and checkpoint.DIGEST_KEY in header["__metadata__"]
    assert (8 + int.from_bytes(raw[:8], "little")) % 8 == 0
    assert all(torch.equal(checkpoint.load_safetensors(tmp_path / "t.safetensors")[k], v) for k, v in tensors.items())


def test_weights_without_any_checksum_load_with_a_warning(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    save_file(load_file(str(weights)), str(weights))  # as another tool writes it: no digest
    assert checkpoint.safetensors_digest(weights) is None
    with pytest.warns(UserWarning, match="carries no checksum and no MANIFEST.json covers it"):
        EgoVLPv2.from_pretrained(tmp_path / "m")
