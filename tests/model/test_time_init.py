"""`video.time_init`: the official zero-initialised temporal attention is a saddle when training from scratch."""

import dataclasses

import pytest
import torch

from egovlp_deploy import EgoVLPv2, EgoVLPv2Config
from egovlp_deploy.config import ConfigError


def _model(time_init: str) -> EgoVLPv2:
    config = EgoVLPv2Config.tiny()
    torch.manual_seed(0)
    return EgoVLPv2(dataclasses.replace(config, video=dataclasses.replace(config.video, time_init=time_init)))


def _qk_grad(model: EgoVLPv2) -> torch.Tensor:
    """|grad| of the temporal attention's query and key weights (first 2/3 of the qkv rows) after one backward."""
    torch.manual_seed(1)
    video = torch.randn(2, 4, 3, 32, 32)
    model.encode_video(video).pow(2).sum().backward()
    grads = [b.timeattn.qkv.weight.grad for b in model.video_model.blocks]
    width = model.config.video.width
    return torch.stack([g[: 2 * width].abs().max() for g in grads])


def test_zeros_is_a_saddle_for_query_and_key():
    model = _model("zeros")
    for block in model.video_model.blocks:
        assert not block.timeattn.qkv.weight.any()
    # q = k = 0: the scores' gradient w.r.t. q is k and w.r.t. k is q, both zero -> exactly no gradient
    assert _qk_grad(model).max() == 0


def test_rand_lets_query_and_key_learn():
    model = _model("rand")
    assert all(block.timeattn.qkv.weight.abs().sum() > 0 for block in model.video_model.blocks)
    assert (_qk_grad(model) > 0).all()


def test_time_init_round_trips_validates_and_defaults_for_old_configs():
    config = EgoVLPv2Config.tiny()
    rand = dataclasses.replace(config, video=dataclasses.replace(config.video, time_init="rand"))
    assert EgoVLPv2Config.from_dict(rand.to_dict()).video.time_init == "rand"
    old = config.to_dict()
    del old["video"]["time_init"]
    assert EgoVLPv2Config.from_dict(old).video.time_init == "zeros"
    bad = config.to_dict()
    bad["video"]["time_init"] = "ones"
    with pytest.raises(ConfigError, match="time_init"):
        EgoVLPv2Config.from_dict(bad).validate()


def test_zeros_is_blind_to_frame_order_and_rand_is_not():
    """With a zero temporal embedding and a no-op temporal attention, a clip and the same clip played backwards
    (picks up / puts down in the synthetic world) get the same embedding: frame order is invisible."""
    torch.manual_seed(2)
    video = torch.randn(1, 4, 3, 32, 32)
    backwards = video.flip(1)
    with torch.no_grad():
        zeros, rand = _model("zeros").eval(), _model("rand").eval()
        torch.testing.assert_close(zeros.encode_video(backwards), zeros.encode_video(video), rtol=1e-5, atol=1e-6)
        assert (rand.encode_video(backwards) - rand.encode_video(video)).abs().max() > 1e-3
