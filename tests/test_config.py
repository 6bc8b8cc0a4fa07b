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
        50265,
        768,
        12,
        514,
        1,
    )
    assert t.max_text_length == 512 and c.num_fuse_blocks == 6
    assert (c.projection, c.projection_dim) == ("big", 4096)
    assert EgoVLPv2Config.base(projection="small").projection_dim == 256


def test_roberta_config_carries_the_sizes():
    rc = EgoVLPv2Config.base().text.to_roberta_config()
    assert (rc.vocab_size, rc.hidden_size, rc.layer_norm_eps, rc.pad_token_id, rc.type_vocab_size) == (
        50265,
        768,
        1e-5,
        1,
        1,
    )


def test_json_round_trip(tmp_path):
    c = EgoVLPv2Config.tiny(num_frames=8)
    (tmp_path / "c.json").write_text(c.to_json())
    assert EgoVLPv2Config.from_json_file(tmp_path / "c.json") == c


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d.update(extra=1), "unknown key"),
        (lambda d: d["video"].pop("width"), "missing key"),
        (lambda d: d["video"].update(width="64"), "video.width must be int"),
        (lambda d: d["video"].update(width=True), "video.width must be int"),
        (lambda d: d.update(projection="huge"), "projection must be one of"),
        (lambda d: d["video"].update(heads=5), "not divisible"),
        (lambda d: d["video"].update(patch_size=5), "not a multiple"),
        (lambda d: d.update(num_fuse_blocks=9), "num_fuse_blocks"),
        (
            lambda d: d["text"].update(num_hidden_layers=0),
            r"text.num_hidden_layers must be an integer in \[1, 128\], got 0",
        ),
    ],
)
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


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "section,key,value,match",
    [
        # non-finite, negative and out-of-range numbers that used to load and fail (or return NaN) at run time
        ("video", "layer_norm_eps", NAN, r"video.layer_norm_eps must be a finite number in \[1e-12, 1\], got nan"),
        ("video", "layer_norm_eps", -1.0, r"video.layer_norm_eps .* got -1.0"),
        ("text", "layer_norm_eps", INF, r"text.layer_norm_eps .* got inf"),
        ("text", "pad_token_id", -5, r"text.pad_token_id must be an integer in \[0, 999\], got -5"),
        ("text", "bos_token_id", 1000, r"text.bos_token_id must be an integer in \[0, 999\], got 1000"),
        ("video", "mlp_ratio", -1.0, r"video.mlp_ratio must be a finite number in \(0, 65536\], got -1.0"),
        ("video", "mlp_ratio", NAN, r"video.mlp_ratio .* got nan"),
        ("video", "mlp_ratio", 0.001, r"video.mlp_ratio 0.001 gives an MLP of .* = 0 channels"),
        ("text", "hidden_act", "gelu_new2", r"text.hidden_act must be one of .*got 'gelu_new2'"),
        ("text", "hidden_dropout_prob", 2.0, r"text.hidden_dropout_prob must be a finite number in \[0, 1\), got 2.0"),
        ("text", "attention_probs_dropout_prob", -0.1, r"text.attention_probs_dropout_prob .* got -0.1"),
        (
            "video",
            "width",
            10**30,
            r"video.width must be an integer in \[1, 16384\], got 1000000000000000000000000000000",
        ),
        ("video", "depth", 100_000, r"video.depth must be an integer in \[1, 128\], got 100000"),
        ("video", "num_frames", 10**9, r"video.num_frames must be an integer in \[1, 512\].*EGOVLP_MAX_FRAMES"),
        ("video", "mlp_ratio", 10**400, r"video.mlp_ratio must be a finite number, got an integer of 401 digits"),
        ("text", "type_vocab_size", 0, r"text.type_vocab_size must be an integer in \[1, 1000000\], got 0"),
        (None, "fusion_layer_norm_eps", 0.0, r"fusion_layer_norm_eps must be a finite number in \[1e-12, 1\], got 0.0"),
        (None, "projection_dim", 10**6, r"projection_dim must be an integer in \[1, 16384\]"),
    ],
)
def test_out_of_range_values_raise_config_error_naming_key_value_and_range(section, key, value, match):
    data = EgoVLPv2Config.tiny().to_dict()
    (data[section] if section else data)[key] = value
    with pytest.raises(ConfigError, match=match):
        EgoVLPv2Config.from_dict(data)


def test_nan_literal_in_config_json_is_refused(tmp_path):
    text = EgoVLPv2Config.tiny().to_json().replace('"layer_norm_eps": 1e-05', '"layer_norm_eps": NaN', 1)
    assert "NaN" in text
    (tmp_path / "c.json").write_text(text)
    with pytest.raises(ConfigError, match="layer_norm_eps must be a finite number"):
        EgoVLPv2Config.from_json_file(tmp_path / "c.json")


def test_ceilings_are_configurable(monkeypatch):
    from egovlp_deploy import config

    base = EgoVLPv2Config.base(num_frames=16)
    assert config.estimated_parameters(base) < config.LIMITS["params"]
    monkeypatch.setitem(config.LIMITS, "frames", 8)
    with pytest.raises(ConfigError, match=r"video.num_frames must be an integer in \[1, 8\], got 16"):
        EgoVLPv2Config.base(num_frames=16)
    monkeypatch.setitem(config.LIMITS, "params", 10**8)
    with pytest.raises(ConfigError, match="about 3.81e\\+08 parameters, above the ceiling 1e\\+08"):
        EgoVLPv2Config.base(num_frames=4)


def test_huge_depth_fails_in_milliseconds():
    import time

    data = EgoVLPv2Config.tiny().to_dict()
    data["video"]["depth"] = 100_000
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="video.depth"):
        EgoVLPv2Config.from_dict(data)
    assert time.perf_counter() - t0 < 0.1
