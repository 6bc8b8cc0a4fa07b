"""Training checkpoints: exact round trip without pickle, atomic directories, corrupt ones skipped."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from egovlp_deploy import CheckpointError, EgoVLPv2, EgoVLPv2Config
from egovlp_deploy.checkpoint import latest_valid_checkpoint, list_checkpoints
from egovlp_deploy.hashing import sha256_file
from egovlp_deploy.trainer.training_state import flatten_state, load_checkpoint, save_checkpoint, unflatten_state


def _optimizer_state():
    model = EgoVLPv2(EgoVLPv2Config.tiny())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    v = torch.randn(1, 4, 3, 32, 32)
    model.encode_video(v).sum().backward()
    opt.step()
    return model, opt


def test_nested_state_round_trip_is_exact():
    _, opt = _optimizer_state()
    state = {"optimizer": opt.state_dict(), "python": [3, tuple(range(5)), None], "step": 7, "lr": 0.5}
    tensors = {}
    skeleton = flatten_state(state, tensors)
    json.dumps(skeleton)  # JSON-serialisable
    back = unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    assert back["python"] == [3, tuple(range(5)), None] and back["step"] == 7
    for pid, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            torch.testing.assert_close(back["optimizer"]["state"][pid][k], v, rtol=0, atol=0)
    assert back["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
    with pytest.raises(TypeError, match="cannot store"):
        flatten_state({"x": object()}, {})


def test_save_load_keep_last_and_fallback(tmp_path):
    model, opt = _optimizer_state()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, {"step": step, "optimizer": opt.state_dict()}, {"seed": 0}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    weights, state, run = load_checkpoint(latest_valid_checkpoint(tmp_path))
    assert state["step"] == 4 and run == {"seed": 0}
    for k, v in model.state_dict().items():
        assert torch.equal(weights[k], v)
    # corrupt the newest: truncated weights -> warning and fall back to step 3
    newest = tmp_path / "step_00000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(UserWarning, match="truncated"):
        assert latest_valid_checkpoint(tmp_path).name == "step_00000003"
    # same size but flipped bytes -> checksum
    state_file = tmp_path / "step_00000003" / "state.json"
    data = bytearray(state_file.read_bytes())
    data[5] ^= 1
    state_file.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert latest_valid_checkpoint(tmp_path) is None
    assert any("checksum" in str(w.message) for w in caught)
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(tmp_path / "step_00000003")


def test_interrupted_save_leaves_no_checkpoint(tmp_path):
    model, _ = _optimizer_state()

    class Boom:
        def __getstate__(self):
            raise RuntimeError

    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 5, model, {"bad": Boom()}, {})
    assert list_checkpoints(tmp_path) == [] and list(tmp_path.iterdir()) == []
    # a half-written directory (no manifest) is never taken
    (tmp_path / "step_00000009").mkdir()
    with pytest.warns(UserWarning, match="did not finish"):
        assert latest_valid_checkpoint(tmp_path) is None


@pytest.mark.parametrize("manifest", [b"\xff\xfe\x00garbage", b'{"step": 3, "fi', b"[1, 2]", b'{"files": [1]}'])
def test_a_corrupt_manifest_falls_back_to_the_previous_checkpoint(tmp_path, manifest):
    """Binary noise (not UTF-8), a truncated write, the wrong JSON kind: each is a CheckpointError, so resume warns
    and takes the older checkpoint instead of crashing on a UnicodeDecodeError or AttributeError."""
    model, opt = _optimizer_state()
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, {"step": step}, {"seed": 0}, keep_last=2)
    (tmp_path / "step_00000002" / "MANIFEST.json").write_bytes(manifest)
    with pytest.warns(UserWarning, match="MANIFEST.json"):
        assert latest_valid_checkpoint(tmp_path).name == "step_00000001"
    with pytest.raises(CheckpointError, match="MANIFEST.json"):
        load_checkpoint(tmp_path / "step_00000002")


def test_a_state_naming_a_missing_tensor_is_a_checkpoint_error(tmp_path):
    model, opt = _optimizer_state()
    path = save_checkpoint(tmp_path, 1, model, {"step": 1, "optimizer": opt.state_dict()}, {})
    # the state.json of a save whose state.safetensors lost a tensor, the manifest made to match
    state = json.loads((path / "state.json").read_text())
    state["__dict__"][0][1] = {"__tensor__": "s.gone"}
    (path / "state.json").write_text(json.dumps(state))
    manifest = json.loads((path / "MANIFEST.json").read_text())
    manifest["files"]["state.json"] = {"sha256": sha256_file(path / "state.json"), "bytes": len(json.dumps(state))}
    (path / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=f"^{path}: state.safetensors lacks the tensor 's.gone' that state.json"):
        load_checkpoint(path)


def test_a_second_save_of_a_step_never_leaves_the_step_without_a_checkpoint(tmp_path, monkeypatch):
    """The step's own save, then the epoch end's, at the same step: with keep_last 1 that step's directory is the only
    checkpoint. A kill while the first one is being deleted must leave one that verifies (here the new one), not a
    half-deleted directory that --resume skips, leaving no checkpoint at all."""
    from egovlp_deploy.trainer import training_state

    model, _ = _optimizer_state()
    save_checkpoint(tmp_path, 3, model, {"step": 3, "epoch": 0}, {}, keep_last=1)
    real_rmtree = training_state.shutil.rmtree

    def killed_while_deleting(path, *args, **kwargs):  # the first file goes, then the process is killed
        (Path(path) / "MANIFEST.json").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(training_state.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 3, model, {"step": 3, "epoch": 1}, {}, keep_last=1)
    monkeypatch.setattr(training_state.shutil, "rmtree", real_rmtree)
    found = latest_valid_checkpoint(tmp_path)
    assert found is not None and found.name == "step_00000003"
    assert load_checkpoint(found)[1]["epoch"] == 1
