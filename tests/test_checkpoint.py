"""Checkpoints: our safetensors format, official `.pth` files, and every way a checkpoint can be wrong."""

import dataclasses
import json
import os
import zipfile

import pytest
import torch
import torch.nn.functional as F
from conftest import make_inputs

from egovlp_deploy import CheckpointError, EgoVLPv2, EgoVLPv2Config, checkpoint
from egovlp_deploy.checkpoint import read_torch_checkpoint, resize_temporal_embed
from official_format import deterministic_state_dict, write_official_checkpoint


def _outputs(model, config, batch=2):
    video, ids, mask = make_inputs(config, batch=batch)
    with torch.no_grad():
        out = model.fuse(video, ids, mask)
        return [
            model.encode_video(video),
            model.encode_text(ids, mask),
            out.video_cls,
            out.text_hidden,
            out.vtm_logits,
            model.mlm_logits(video, ids, mask),
        ]


@pytest.fixture
def official_tiny(tmp_path, tiny_config):
    model = EgoVLPv2(tiny_config)
    state = deterministic_state_dict(model, seed=11)
    model.load_state_dict(state)
    path = tmp_path / "EgoVLPv2_tiny.pth"
    write_official_checkpoint(state, path, tiny_config.text.max_position_embeddings)
    return model.eval(), state, path


# -- our format ----------------------------------------------------------------------------------------------------
def test_save_and_load_pretrained_round_trip(tmp_path, tiny_model, tiny_config):
    tiny_model.save_pretrained(tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    loaded = EgoVLPv2.from_pretrained(tmp_path / "m")
    assert loaded.config == tiny_config
    for a, b in zip(_outputs(tiny_model, tiny_config), _outputs(loaded, tiny_config)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # safetensors: an 8-byte header length then JSON, nothing pickled
    raw = (tmp_path / "m" / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert "video_model.pos_embed" in header


def test_from_pretrained_errors(tmp_path, tiny_model):
    with pytest.raises(CheckpointError, match="missing config.json"):
        EgoVLPv2.from_pretrained(tmp_path)
    tiny_model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        EgoVLPv2.from_pretrained(tmp_path / "m")
    weights.write_bytes(good)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["video"]["numframes"] = 4
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown key"):
        EgoVLPv2.from_pretrained(tmp_path / "m")
    del cfg["video"]["numframes"]
    cfg["video"]["width"] = 32
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="is not the config"):  # the weights recorded the config's digest
        EgoVLPv2.from_pretrained(tmp_path / "m")
    # weights that recorded no config (another tool's): the shapes still tell
    checkpoint.save_safetensors(checkpoint.load_safetensors(weights), weights, metadata={"format": "other"})
    with pytest.raises(
        CheckpointError, match=r"wrong shapes: .*vid_proj\.0\.weight: checkpoint \(128, 64\) vs model \(128, 32\)"
    ):
        EgoVLPv2.from_pretrained(tmp_path / "m")


# -- official format -----------------------------------------------------------------------------------------------
def test_official_checkpoint_loads_strictly_and_matches(official_tiny, tiny_config):
    model, _, path = official_tiny
    loaded = EgoVLPv2.from_official_checkpoint(path, config=tiny_config)
    for a, b in zip(_outputs(model, tiny_config), _outputs(loaded, tiny_config)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_official_checkpoint_config_is_read_from_the_weights(tmp_path):
    """Without a config, sizes come from the shapes (64-wide heads, as in every released model)."""
    config = dataclasses.replace(
        EgoVLPv2Config.tiny(),
        video=dataclasses.replace(EgoVLPv2Config.tiny().video, heads=1),
        text=dataclasses.replace(EgoVLPv2Config.tiny().text, num_attention_heads=1),
        projection="small",
        projection_dim=32,
    )
    model = EgoVLPv2(config)
    state = deterministic_state_dict(model, seed=3)
    write_official_checkpoint(state, tmp_path / "small.pth", config.text.max_position_embeddings)
    loaded = EgoVLPv2.from_official_checkpoint(tmp_path / "small.pth")
    assert loaded.config == config


def test_temporal_embedding_follows_the_official_rule():
    te = torch.randn(1, 4, 6)
    grown = resize_temporal_embed(te, 16)
    # bilinear with align_corners over (frames, dim) = linear interpolation along time at positions j*3/15
    for j in range(16):
        pos = j * 3 / 15
        lo = min(int(pos), 2)
        w = pos - lo
        torch.testing.assert_close(grown[0, j], (1 - w) * te[0, lo] + w * te[0, lo + 1])
    torch.testing.assert_close(grown, F.interpolate(te[None], (16, 6), mode="bilinear", align_corners=True)[0])
    torch.testing.assert_close(resize_temporal_embed(te, 2), te[:, :2])  # more frames in the file: truncate
    assert resize_temporal_embed(te, 4) is te


def test_official_checkpoint_at_more_frames(official_tiny, tiny_config):
    _, state, path = official_tiny
    model16 = EgoVLPv2.from_official_checkpoint(path, num_frames=16, config=tiny_config)
    assert model16.config.video.num_frames == 16
    torch.testing.assert_close(
        model16.video_model.temporal_embed, resize_temporal_embed(state["video_model.temporal_embed"], 16)
    )
    video, ids, mask = make_inputs(model16.config, batch=1)
    assert model16.encode_video(video).shape == (1, tiny_config.projection_dim)


def _rewrite(path, mutate):
    ckpt = torch.load(path, weights_only=False)
    mutate(ckpt["state_dict"])
    torch.save(ckpt, path)


def test_official_checkpoint_key_problems_are_listed(official_tiny, tiny_config):
    _, _, path = official_tiny
    _rewrite(path, lambda sd: sd.pop("module.itm_score.fc.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys: itm_score\.fc\.bias"):
        EgoVLPv2.from_official_checkpoint(path, config=tiny_config)
    _rewrite(path, lambda sd: sd.update({"module.itm_score.fc.bias": torch.zeros(2), "module.extra.w": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys: extra\.w"):
        EgoVLPv2.from_official_checkpoint(path, config=tiny_config)
    _rewrite(path, lambda sd: (sd.pop("module.extra.w"), sd.update({"module.itm_score.fc.bias": torch.zeros(3)})))
    with pytest.raises(CheckpointError, match=r"wrong shapes: itm_score\.fc\.bias: checkpoint \(3,\) vs model \(2,\)"):
        EgoVLPv2.from_official_checkpoint(path, config=tiny_config)


def test_truncated_checkpoint(official_tiny, tiny_config):
    _, _, path = official_tiny
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 100, 10):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated|corrupt|not a torch"):
            EgoVLPv2.from_official_checkpoint(path, config=tiny_config)


def test_foreign_checkpoints(tmp_path):
    torch.save({"state_dict": {"module.conv1.weight": torch.zeros(3, 3)}}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="not an EgoVLPv2 checkpoint"):
        EgoVLPv2.from_official_checkpoint(tmp_path / "resnet.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not an EgoVLPv2 checkpoint"):
        EgoVLPv2.from_official_checkpoint(tmp_path / "list.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(CheckpointError, match="not a torch zip checkpoint"):
        EgoVLPv2.from_official_checkpoint(tmp_path / "text.pth")
    with pytest.raises(CheckpointError, match="no such file"):
        EgoVLPv2.from_official_checkpoint(tmp_path / "missing.pth")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_never_run(tmp_path, official_tiny, tiny_config):
    marker = tmp_path / "pwned"
    # 1. the payload alone
    torch.save(_Exploit(marker), tmp_path / "evil.pth")
    with pytest.raises(CheckpointError):
        EgoVLPv2.from_official_checkpoint(tmp_path / "evil.pth")
    # 2. the payload hidden in an otherwise valid checkpoint, where the official pickled config object sits
    _, _, path = official_tiny
    ckpt = torch.load(path, weights_only=False)
    ckpt["config"] = _Exploit(marker)
    torch.save(ckpt, path)
    EgoVLPv2.from_official_checkpoint(path, config=tiny_config)
    obj = read_torch_checkpoint(path)
    assert "os.system" in repr(obj["config"]) or "posix.system" in repr(obj["config"])
    # the same file really is an exploit: the standard unpickler runs it
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    EgoVLPv2.from_official_checkpoint(path, config=tiny_config)
    assert not marker.exists()


def test_reader_matches_torch_load_on_real_files(tmp_path):
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.arange(5),
        "c": torch.randn(4, 3).t(),
        "d": torch.ones(2).half(),
        "e": torch.tensor([True, False]),
        "f": torch.randn(6)[2:],
    }
    torch.save({"state_dict": tensors, "nested": {"x": [torch.zeros(1)]}}, tmp_path / "t.pth")
    ours = read_torch_checkpoint(tmp_path / "t.pth")
    for k, v in tensors.items():
        assert ours["state_dict"][k].dtype == v.dtype
        torch.testing.assert_close(ours["state_dict"][k], v, rtol=0, atol=0)
    torch.testing.assert_close(ours["nested"]["x"][0], torch.zeros(1))


def test_zip_with_missing_storage_is_truncated(tmp_path, official_tiny):
    _, _, path = official_tiny
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp_path / "cut.pth", "w") as dst:
        names = src.namelist()
        dropped = next(n for n in names if "/data/" in n)
        for n in names:
            if n != dropped:
                dst.writestr(n, src.read(n))
    with pytest.raises(CheckpointError, match="truncated"):
        read_torch_checkpoint(tmp_path / "cut.pth")
