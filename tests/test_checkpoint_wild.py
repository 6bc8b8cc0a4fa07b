"""Checkpoints nobody here made: official-format files with odd contents and training checkpoints with an edited
MANIFEST.json. Each is refused with a CheckpointError that names the file and the key, never loaded with silently
wrong weights and never a traceback from deeper down."""

import collections
import io
import json
import re
import warnings
import zipfile

import pytest
import torch
from test_checkpoint_limits import _Pickler, _Storage

from egovlp_deploy import CheckpointError, EgoVLPv2, checkpoint
from egovlp_deploy.checkpoint import read_torch_checkpoint
from egovlp_deploy.model.factory import load_model
from egovlp_deploy.trainer.training_state import save_checkpoint
from official_format import deterministic_state_dict, write_official_checkpoint


@pytest.fixture
def state(tiny_config):
    return deterministic_state_dict(EgoVLPv2(tiny_config), seed=11)


def save_official(state, path, **replace):
    torch.save({"state_dict": {"module." + k: v for k, v in {**state, **replace}.items()}, "epoch": 3}, path)
    return path


# -- official files ------------------------------------------------------------------------------------------------
def test_module_prefixed_and_bare_copies_of_one_tensor_are_refused(tmp_path, state):
    """`module.x` and `x` both name x once the DDP prefix is removed: which one the official code would load is
    unknowable, so neither is taken."""
    official = {"module." + k: v for k, v in state.items()}
    official["video_model.pos_embed"] = torch.zeros_like(state["video_model.pos_embed"])
    torch.save({"state_dict": official}, tmp_path / "both.pth")
    with pytest.raises(CheckpointError, match=r"both\.pth: state_dict holds both 'module\.video_model\.pos_embed' and"):
        EgoVLPv2.from_official_checkpoint(tmp_path / "both.pth")


@pytest.mark.parametrize(
    "key, shape, frames",
    [
        ("video_model.temporal_embed", (4,), None),
        ("video_model.temporal_embed", (4, 64), 16),
        ("video_model.temporal_embed", (1, 0, 64), 16),
        ("video_model.pos_embed", (), None),
        ("video_model.patch_embed.proj.weight", (3,), None),
        ("video_model.blocks.0.mlp.fc1.weight", (), None),
    ],
)
def test_tensors_the_architecture_is_read_from_with_the_wrong_rank(tmp_path, state, key, shape, frames):
    path = save_official(state, tmp_path / "odd.pth", **{key: torch.zeros(shape)})
    with pytest.raises(CheckpointError, match=re.escape(f"odd.pth: {key} has shape {tuple(shape)}, not a non-empty")):
        EgoVLPv2.from_official_checkpoint(path, num_frames=frames)


def test_architecture_errors_name_the_file(tmp_path, state):
    del state["video_model.patch_embed.proj.weight"]
    with pytest.raises(CheckpointError, match=r"nopatch\.pth: not an EgoVLPv2 checkpoint: missing video_model\.patch"):
        EgoVLPv2.from_official_checkpoint(save_official(state, tmp_path / "nopatch.pth"))


def test_integer_weights_are_refused_not_cast(tmp_path, state):
    """An int8 tensor (quantised, or not a weight at all) cast to float would load as garbage weights."""
    key = "video_model.blocks.0.mlp.fc1.weight"
    path = save_official(state, tmp_path / "int8.pth", **{key: (state[key] * 1000).to(torch.int8)})
    with pytest.raises(CheckpointError, match=rf"int8\.pth .*wrong dtypes: {key}: checkpoint torch\.int8"):
        EgoVLPv2.from_official_checkpoint(path)
    half = save_official(state, tmp_path / "half.pth", **{key: state[key].half()})
    assert EgoVLPv2.from_official_checkpoint(half).state_dict()[key].dtype == torch.float32  # fp16 still loads


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, state, tiny_model, value):
    """NaN embeddings rank like numbers in argmax and top-k: an evaluation would print accuracies of nothing."""
    key = "text_model.encoder.layer.0.intermediate.dense.weight"
    poisoned = state[key].clone()
    poisoned[0, 0] = value
    path = save_official(state, tmp_path / "nan.pth", **{key: poisoned})
    with pytest.raises(CheckpointError, match=rf"nan\.pth .*NaN or infinite values: {key}"):
        EgoVLPv2.from_official_checkpoint(path)
    with torch.no_grad():
        tiny_model.video_model.pos_embed[0, 0, 0] = value
    tiny_model.save_pretrained(tmp_path / "ours")  # our own format, digest and all
    with pytest.raises(CheckpointError, match=r"ours does not fit .*NaN or infinite values: video_model\.pos_embed"):
        EgoVLPv2.from_pretrained(tmp_path / "ours")


def test_archive_with_a_member_twice_is_refused(tmp_path, state, tiny_config):
    """Zip readers differ on which of two members of one name they take: the tensors would be ambiguous."""
    write_official_checkpoint(state, tmp_path / "one.pth", tiny_config.text.max_position_embeddings)
    with zipfile.ZipFile(tmp_path / "one.pth") as src, zipfile.ZipFile(tmp_path / "twice.pth", "w") as dst:
        storage = next(n for n in src.namelist() if "/data/" in n)
        for name in src.namelist():
            dst.writestr(name, src.read(name))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns of the duplicate name
            dst.writestr(storage, bytes(src.getinfo(storage).file_size))
    with pytest.raises(CheckpointError, match=rf"twice\.pth: corrupt checkpoint: the archive holds '{storage}' more"):
        EgoVLPv2.from_official_checkpoint(tmp_path / "twice.pth")


def test_nested_state_dict_under_another_key_names_what_was_found(tmp_path, state):
    torch.save({"model": state, "epoch": 3}, tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match=r"no 'state_dict' entry; found a dict of \['epoch', 'model'\]"):
        EgoVLPv2.from_official_checkpoint(tmp_path / "model.pth")


# -- training checkpoints with an edited manifest -----------------------------------------------------------------
@pytest.fixture
def step_dir(tmp_path, tiny_model):
    return save_checkpoint(tmp_path / "run" / "checkpoints", 5, tiny_model, {"step": 5}, {"seed": 0})


def edit_manifest(step_dir, edit):
    manifest = json.loads((step_dir / checkpoint.MANIFEST).read_text())
    edit(manifest["files"])
    (step_dir / checkpoint.MANIFEST).write_text(json.dumps(manifest))


def flip_a_weight_bit(step_dir):
    weights = step_dir / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-100] ^= 0x10
    weights.write_bytes(bytes(raw))


@pytest.mark.parametrize("drop", [["model.safetensors"], "all"])
def test_manifest_that_leaves_out_the_weights_does_not_vouch_for_them(step_dir, drop):
    """With a manifest the weights' own digest is not checked: a manifest that does not list them would let
    corrupt weights load unchecked."""
    edit_manifest(step_dir, lambda files: files.clear() if drop == "all" else files.pop("model.safetensors"))
    flip_a_weight_bit(step_dir)
    with pytest.raises(CheckpointError, match=r"MANIFEST\.json does not list .*model\.safetensors"):
        load_model(step_dir)
    with pytest.raises(CheckpointError, match=r"MANIFEST\.json does not list .*model\.safetensors"):
        EgoVLPv2.from_pretrained(step_dir)
    with pytest.warns(UserWarning, match="skipping checkpoint"):  # a run falls back to nothing, not to these
        assert checkpoint.latest_valid_checkpoint(step_dir.parent) is None


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda f: f["model.safetensors"].pop("bytes"), "the entry of model.safetensors is not"),
        (lambda f: f.update({"model.safetensors": "abc"}), "the entry of model.safetensors is not"),
        (lambda f: f["model.safetensors"].update(bytes="12"), "the entry of model.safetensors is not"),
        (lambda f: f["config.json"].update(sha256=None), "the entry of config.json is not"),
        (lambda f: f.update({"../step_00000004/model.safetensors": f["run.json"]}), "is not the name of a file"),
    ],
)
def test_malformed_manifest_entries_are_named(step_dir, edit, match):
    edit_manifest(step_dir, edit)
    with pytest.raises(CheckpointError, match=rf"step_00000005/MANIFEST\.json: .*{match}"):
        load_model(step_dir)


class _Source:
    def __init__(self, storage):
        self.storage = storage

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, (2,), (1,), False, collections.OrderedDict())


class _BuiltThenChanged(_Source):
    """A tensor rebuilt within its storage, then given pickled state (BUILD): Tensor.__setstate__ runs on it."""

    def __init__(self, storage, state):
        super().__init__(storage)
        self.state = state

    def __reduce__(self):
        args = (self.storage, 0, (1,), (1,), False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args, self.state


@pytest.mark.parametrize(
    "state",
    [
        lambda s: (_Source(s), 0, (4 * 10**9,), (0,)),  # set_: a stride-0 view of 4e9 elements, 32 GB once copied
        lambda s: (_Source(s), None, None, False, {}),  # `.data` replaced by another tensor
        lambda s: (True, None, {"hook": 1}),  # requires_grad and backward hooks set
    ],
)
def test_pickled_state_applied_to_a_tensor_is_refused(tmp_path, state):
    storage = _Storage("0", 2)
    data = io.BytesIO()
    _Pickler(data, protocol=2).dump({"state_dict": {"w": _BuiltThenChanged(storage, state(storage))}})
    with zipfile.ZipFile(tmp_path / "built.pth", "w") as archive:
        archive.writestr("archive/data.pkl", data.getvalue())
        archive.writestr("archive/data/0", bytes(8))
    with pytest.raises(CheckpointError, match=r"built\.pth: malformed checkpoint: pickled state is applied to a"):
        read_torch_checkpoint(tmp_path / "built.pth")


# -- save_pretrained folders ---------------------------------------------------------------------------------------
def test_an_edited_config_json_is_refused(tmp_path, tiny_model):
    """config.json is read as it is, and the tensor digest does not cover it: another eps would load and change every
    output. The weights' header records the digest of the config they were saved with."""
    folder = tiny_model.save_pretrained(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["video"]["layer_norm_eps"] = 1e-3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json is not the config .*model\.safetensors was saved with"):
        EgoVLPv2.from_pretrained(folder)


def test_a_reformatted_config_and_another_attention_backend_load_unchanged(tmp_path, tiny_model, tiny_inputs):
    """Only the settings count, not the JSON's layout; attention_backend picks an implementation of the same
    function, so a user may switch it in config.json."""
    folder = tiny_model.save_pretrained(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["attention_backend"] = "sdpa"
    (folder / "config.json").write_text(json.dumps(dict(reversed(list(config.items())))))  # one line, keys reversed
    model = EgoVLPv2.from_pretrained(folder)
    assert model.config.attention_backend == "sdpa"
    video, _, _ = tiny_inputs
    with torch.no_grad():
        torch.testing.assert_close(model.encode_video(video), tiny_model.encode_video(video), rtol=1e-5, atol=1e-6)


def test_weights_saved_without_a_config_digest_still_load(tmp_path, tiny_model):
    """Folders written before the weights recorded their config's digest (or by another tool) load as before."""
    folder = tiny_model.save_pretrained(tmp_path / "m")
    tensors = checkpoint.load_safetensors(folder / "model.safetensors")
    checkpoint.save_safetensors(tensors, folder / "model.safetensors", metadata={"format": "egovlp-deploy"})
    assert "egovlp.config_sha256" not in checkpoint.safetensors_metadata(folder / "model.safetensors")
    EgoVLPv2.from_pretrained(folder)
