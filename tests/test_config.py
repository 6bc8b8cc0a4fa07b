"""Model configs: the paper sizes, the tiny model, strict JSON round trips."""

import json

import pytest

from egovlp_deploy import ConfigError, EgoVLPv2Config


def test_base_is_the_paper_model():
    c = EgoVLPv2Config.base(num_frames=16)
    assert (c.video.img_size, c.video.patch_size, c.video.width, c.video.depth, c.video.heads) == (224, 16, 768, 12, 12)
    assert c.video.num_frames == 16 and c.video.num_tokens == 1 + 16 * 196
    assert c.video.layer_norm_eps == 1e-5 and c.fusion_layer_norm_eps == 1e-6 and c.mlm_layer_norm_eps == 1e-12
    t = c.text
    assert (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.max_position_embeddings, t.pad_token_id) == (
        50265, 768, 12, 514, 1)
    assert t.max_text_length == 512 and c.num_fuse_blocks == 6
    assert (c.projection, c.projection_dim) == ("big", 4096)
    assert EgoVLPv2Config.base(projection="small").projection_dim == 256


def test_roberta_config_carries_the_sizes():
    rc = EgoVLPv2Config.base().text.to_roberta_config()
    assert (rc.vocab_size, rc.hidden_size, rc.layer_norm_eps, rc.pad_token_id, rc.type_vocab_size) == (
        50265, 768, 1e-5, 1, 1)


def test_json_round_trip(tmp_path):
    c = EgoVLPv2Config.tiny(num_frames=8)
    (tmp_path / "c.json").write_text(c.to_json())
    assert EgoVLPv2Config.from_json_file(tmp_path / "c.json") == c


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(extra=1), "unknown key"),
    (lambda d: d["video"].pop("width"), "missing key"),
    (lambda d: d["video"].update(width="64"), "video.width must be int"),
    (lambda d: d["video"].update(width=True), "video.width must be int"),
    (lambda d: d.update(projection="huge"), "projection must be one of"),
    (lambda d: d["video"].update(heads=5), "not divisible"),
    (lambda d: d["video"].update(patch_size=5), "not a multiple"),
    (lambda d: d.update(num_fuse_blocks=9), "num_fuse_blocks"),
    (lambda d: d["text"].update(num_hidden_layers=0), "positive integer"),
])
def test_bad_configs(mutate, match):
    data = EgoVLPv2Config.tiny().to_dict()
    mutate(data)
    with pytest.raises(ConfigError, match=match):
        EgoVLPv2Config.from_dict(data)


def test_malformed_json(tmp_path):
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        EgoVLPv2Config.from_json_file(tmp_path / "c.json")
    (tmp_path / "c.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="JSON object"):
        EgoVLPv2Config.from_json_file(tmp_path / "c.json")
