"""The training config schema: shipped configs load, unknown keys and bad values are errors, overrides parse."""

import json

import pytest
import torch

from egovlp_deploy import ConfigError
from egovlp_deploy.trainer.config import SHIPPED, TrainConfig
from egovlp_deploy.trainer.train import apply_overrides


def test_shipped_configs_load():
    names = sorted(p.name for p in SHIPPED.glob("*.json"))
    assert "pretrain_egoclip.json" in names and "tiny_synthetic.json" in names
    official = TrainConfig.load(SHIPPED / "pretrain_egoclip.json")
    assert (official.optim.lr, official.optim.lr_mult_head, official.optim.lr_mult_cross_modal) == (3e-5, 4.0, 4.0)
    assert (official.objective.egonce_weight, official.objective.mlm_weight, official.objective.vtm_weight) == (1, 1, 2)
    assert official.schedule.epochs == 20 and official.data.neg_window == 60 and official.data.text_max_length == 15
    assert TrainConfig.load("tiny_synthetic.json").model.preset == "tiny"  # a shipped config by name


@pytest.mark.parametrize(
    "data,match",
    [
        ({"optim": {"lr": 1e-4, "learning_rate": 1}}, "unknown key"),
        ({"schedulee": {}}, "unknown key"),
        ({"schedule": {"epochs": "ten"}}, "schedule.epochs must be int"),
        ({"schedule": {"precision": "fp8"}}, "precision"),
        ({"schedule": {"batch_size": 10, "grad_accum_steps": 3}}, "divisible"),
        ({"model": {"preset": "huge"}}, "preset"),
        ({"model": {"text_warmup_steps": -1}}, "text_warmup_steps"),
        ({"model": {"temporal_embed_std": -0.1}}, "temporal_embed_std"),
        ({"optim": {"lr_mult_text": 0}}, "lr_mult_text"),
        ({"optim": {"text_freeze_steps": -1}}, "text_freeze_steps"),
        ({"optim": {"text_freeze_fraction": 1.0}}, r"text_freeze_fraction must be in \[0, 1\)"),
        ({"optim": {"text_freeze_steps": 300, "text_freeze_fraction": 0.25}}, "not both"),
        ({"data": {"frame_cache_mb": -1}}, "data.frame_cache_mb must be >= 0"),
        ({"data": {"num_workers": -2}}, "data.num_workers must be >= 0"),
        ({"model": {"img_size": 0}}, "model.img_size"),
        ({"objective": {"vtm_negative_temperature": 0}}, "vtm_negative_temperature"),
        ({"objective": {"vtm_negative_anneal": True}}, "needs objective.vtm_negative_temperature"),
        ({"objective": {"text_simcse_weight": -1}}, "text_simcse_weight must be >= 0"),
        ({"model": {"patch_size": -8}}, "model.patch_size"),
    ],
)
def test_bad_configs(data, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(data)


def test_malformed_file(tmp_path):
    (tmp_path / "c.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        TrainConfig.load(tmp_path / "c.json")
    with pytest.raises(ConfigError, match="no such config"):
        TrainConfig.load(tmp_path / "missing.json")


def test_overrides():
    data = apply_overrides(TrainConfig().to_dict(), ["schedule.epochs=2", "data.root=/x", "optim.grad_clip=null"])
    cfg = TrainConfig.from_dict(data)
    assert cfg.schedule.epochs == 2 and cfg.data.root == "/x" and cfg.optim.grad_clip is None
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["epochs"])


def test_frame_and_patch_size_override_the_preset():
    from egovlp_deploy.trainer.train import build_model

    model = build_model(TrainConfig.from_dict({"model": {"preset": "tiny", "img_size": 64, "patch_size": 16}}), 1000)
    v = model.config.video
    assert (v.img_size, v.patch_size, v.num_tokens) == (64, 16, 1 + 4 * 16)  # same 16 tokens per frame as 32/8
    assert model.encode_video(torch.zeros(1, 4, 3, 64, 64)).shape == (1, model.config.projection_dim)
    plain = build_model(TrainConfig.from_dict({"model": {"preset": "tiny"}}), 1000).config.video
    assert (plain.img_size, plain.patch_size) == (32, 8)
    with pytest.raises(ConfigError, match="model.img_size 60 is not a multiple of model.patch_size 16"):
        TrainConfig.from_dict({"model": {"preset": "tiny", "img_size": 60, "patch_size": 16}})


def test_the_text_freeze_scales_with_the_run_when_given_as_a_fraction():
    as_fraction = TrainConfig.from_dict({"optim": {"text_freeze_fraction": 0.25}}).optim
    assert [as_fraction.freeze_steps(n) for n in (1200, 400, 3)] == [300, 100, 0]
    as_steps = TrainConfig.from_dict({"optim": {"text_freeze_steps": 300}}).optim
    assert [as_steps.freeze_steps(n) for n in (1200, 400)] == [300, 300]
    assert TrainConfig.from_dict({}).optim.freeze_steps(1200) == 0  # official: no hold
