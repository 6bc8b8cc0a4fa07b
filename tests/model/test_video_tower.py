"""Video tower invariants from the official SpaceTimeTransformer."""

import torch

from egovlp_deploy import EgoVLPv2Config
from egovlp_deploy.model.video_tower import SpaceTimeBlock, SpaceTimeTransformer
from official_format import randomize_


def _block():
    cfg = EgoVLPv2Config.tiny().video
    return randomize_(SpaceTimeBlock(cfg, text_width=None), seed=3).eval(), cfg


def test_block_residual_skips_the_time_output():
    block, cfg = _block()
    x = torch.randn(2, cfg.num_tokens, cfg.width)
    F = cfg.num_frames
    t = block.timeattn(block.norm3(x), F)
    s = block.attn(block.norm1(x + t), F)
    x1 = x + s  # the residual base is x, not x + t
    expected = x1 + block.mlp(block.norm2(x1))
    torch.testing.assert_close(block(x, F), expected)
    wrong = (x + t + s) + block.mlp(block.norm2(x + t + s))
    assert not torch.allclose(block(x, F), wrong, atol=1e-4)


def test_time_init_zeros_makes_the_block_a_vit_block():
    cfg = EgoVLPv2Config.tiny().video
    tower = SpaceTimeTransformer(cfg, num_fuse_blocks=0, text_width=cfg.width)  # fresh init: time_init='zeros'
    block = tower.blocks[0].eval()
    assert torch.all(block.timeattn.proj.weight == 1) and torch.all(block.timeattn.qkv.weight == 0)
    x = torch.randn(1, cfg.num_tokens, cfg.width)
    assert torch.equal(block.timeattn(block.norm3(x), cfg.num_frames), torch.zeros_like(x))


def test_dual_tower_returns_the_normed_clip_cls():
    cfg = EgoVLPv2Config.tiny().video
    tower = randomize_(SpaceTimeTransformer(cfg, num_fuse_blocks=1, text_width=cfg.width), seed=4).eval()
    video = torch.randn(2, cfg.num_frames, 3, cfg.img_size, cfg.img_size)
    x = tower.embed(video, tower.cls_token)
    for block in tower.blocks:
        x = block(x, cfg.num_frames)
    torch.testing.assert_close(tower(video), tower.norm(x)[:, 0])
    assert tower.norm.eps == 1e-5  # video_model.norm keeps nn.LayerNorm's default (official norm_layer)


def test_positions_are_frame_major_with_temporal_embedding():
    cfg = EgoVLPv2Config.tiny(num_frames=3).video
    tower = randomize_(SpaceTimeTransformer(cfg, num_fuse_blocks=0, text_width=cfg.width), seed=5)
    video = torch.zeros(1, 3, 3, cfg.img_size, cfg.img_size)
    tokens = tower.embed(video, tower.cls_token)
    patch_bias = tower.patch_embed.proj.bias
    N = cfg.patches_per_frame
    torch.testing.assert_close(tokens[0, 0], tower.cls_token[0, 0] + tower.pos_embed[0, 0])
    f, n = 2, 7
    expected = patch_bias + tower.pos_embed[0, 1 + n] + tower.temporal_embed[0, f]
    torch.testing.assert_close(tokens[0, 1 + f * N + n], expected)
