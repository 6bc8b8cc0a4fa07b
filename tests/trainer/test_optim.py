"""Parameter groups and schedule against the official set_schedule rules."""

import math

import pytest
import torch

from egovlp_deploy import EgoVLPv2, EgoVLPv2Config
from egovlp_deploy.trainer.optim import (
    build_optimizer,
    build_scheduler,
    cosine_with_warmup,
    is_text_tower,
    parameter_groups,
)


def _official_group(name: str) -> tuple[str, bool]:
    """The official membership test, written out independently from its six list comprehensions."""
    no_decay = [
        "bias",
        "LayerNorm.bias",
        "LayerNorm.weight",
        "norm.bias",
        "norm.weight",
        "norm1.bias",
        "norm1.weight",
        "norm2.bias",
        "norm2.weight",
    ]
    heads = ["mlm_score", "itm_score", "txt_proj", "vid_proj"]
    cross = ["cross_modal", "i2t", "t2i"]
    kind = "head" if any(h in name for h in heads) else "cross_modal" if any(c in name for c in cross) else "backbone"
    return kind, not any(nd in name for nd in no_decay)


def test_groups_follow_the_official_rules():
    model = EgoVLPv2(EgoVLPv2Config.tiny())
    groups = parameter_groups(model, lr=1.0, weight_decay=0.01, lr_mult_head=4, lr_mult_cross_modal=5)
    seen = {}
    for g in groups:
        kind, decay = g["group"].split("/")
        for name in g["names"]:
            seen[name] = (kind, decay == "decay")
            assert g["lr"] == {"head": 4.0, "cross_modal": 5.0, "backbone": 1.0}[kind]
            assert g["weight_decay"] == (0.01 if decay == "decay" else 0.0)
    assert set(seen) == {n for n, _ in model.named_parameters()}  # nothing dropped
    for name in seen:
        assert seen[name] == _official_group(name), name
    # the hazards, spelled out
    assert seen["video_model.blocks.3.attn.alpha_i2t"] == ("cross_modal", True)  # gates are decayed, x mult
    assert seen["text_model.encoder.layer.3.alpha_t2i"] == ("cross_modal", True)
    assert seen["video_model.blocks.0.norm3.weight"] == ("backbone", True)  # norm3 is not in the no-decay list
    assert seen["video_model.blocks.0.norm1.weight"] == ("backbone", False)
    assert seen["cls_token"] == ("backbone", True) and seen["video_model.temporal_embed"] == ("backbone", True)
    assert seen["mlm_score.bias"] == ("head", False)


def test_text_multiplier_scales_the_text_tower_only():
    model = EgoVLPv2(EgoVLPv2Config.tiny())
    plain = {n: g["lr"] for g in parameter_groups(model, 1.0, 0.01, 4, 5) for n in g["names"]}
    scaled = {n: g["lr"] for g in parameter_groups(model, 1.0, 0.01, 4, 5, lr_mult_text=0.1) for n in g["names"]}
    assert set(plain) == set(scaled)
    for name, lr in plain.items():
        text = name.startswith(("text_model.", "txt_proj.")) and not any(
            c in name for c in ("cross_modal", "i2t", "t2i")
        )
        assert scaled[name] == pytest.approx(lr * 0.1 if text else lr), name
    # spelled out: RoBERTa layers and the text projection slow down; cross-attention, heads and video do not
    assert scaled["text_model.embeddings.word_embeddings.weight"] == pytest.approx(0.1)
    assert scaled[next(n for n in scaled if n.startswith("txt_proj."))] == pytest.approx(0.4)  # head x4, text x0.1
    assert scaled["text_model.encoder.layer.3.alpha_t2i"] == 5.0 and scaled["mlm_score.bias"] == 4.0
    assert scaled["video_model.temporal_embed"] == 1.0
    # the default keeps the official groups exactly (no extra group)
    assert len(parameter_groups(model, 1.0, 0.01, 4, 5)) == len(parameter_groups(model, 1.0, 0.01, 4, 5, 1.0))


def test_optimizer_hyperparameters():
    opt = build_optimizer(EgoVLPv2(EgoVLPv2Config.tiny()), 3e-5, 0.01, 4, 4)
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["betas"] == (0.9, 0.98) and g["eps"] == 1e-8 for g in opt.param_groups)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([3e-5, 1.2e-4])


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_cosine_schedule_matches_transformers():
    transformers = pytest.importorskip("transformers")
    p = torch.nn.Parameter(torch.zeros(1))
    ours = build_scheduler(torch.optim.SGD([p], lr=1.0), warmup_steps=10, total_steps=100)
    ref = transformers.get_cosine_schedule_with_warmup(torch.optim.SGD([p], lr=1.0), 10, 100)
    for _ in range(100):
        assert ours.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], abs=1e-12)
        ours.step()
        ref.step()
    assert cosine_with_warmup(0, 10, 100) == 0 and cosine_with_warmup(10, 10, 100) == 1
    assert cosine_with_warmup(55, 10, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_text_freeze_holds_the_text_tower_then_releases_it():
    """optim.text_freeze_steps: for the first N steps the text tower's learning rate is 0 (its weights stay bit-exact
    while everything else trains), then it follows the others' cosine curve times lr_mult_text."""
    torch.manual_seed(0)
    model = EgoVLPv2(EgoVLPv2Config.tiny())
    opt = build_optimizer(model, 1e-2, 0.01, 4, 4, lr_mult_text=0.5, split_text=True)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=20, text_freeze_steps=3)
    text = {n: p for n, p in model.named_parameters() if is_text_tower(n)}
    video = {n: p for n, p in model.named_parameters() if n.startswith("video_model.blocks.0.")}
    assert text and video
    start_text = {n: p.detach().clone() for n, p in text.items()}
    ids = torch.tensor([[0, 10, 11, 12, 2]])
    for step in range(5):
        before_video = {n: p.detach().clone() for n, p in video.items()}
        lrs = {g["group"]: g["lr"] for g in opt.param_groups}
        loss = (
            model.encode_text(ids, torch.ones_like(ids)).square().sum()
            + model.encode_video(torch.randn(1, 4, 3, 32, 32)).square().sum()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        frozen = step < 3
        assert all(lr == 0 for g, lr in lrs.items() if "/text/" in g) == frozen
        assert all(lr > 0 for g, lr in lrs.items() if "/text/" not in g) or step == 0  # warm-up starts at 0
        if step > 0:
            assert any(not torch.equal(before_video[n], p) for n, p in video.items())
        moved = [n for n, p in text.items() if not torch.equal(start_text[n], p)]
        assert (not moved) if frozen else moved
    # after the freeze: the text groups run at lr_mult_text x the backbone's lr at the same step
    lrs = {g["group"]: g["lr"] for g in opt.param_groups}
    assert lrs["backbone/text/decay"] == pytest.approx(0.5 * lrs["backbone/decay"])


def test_text_freeze_needs_text_groups():
    opt = build_optimizer(EgoVLPv2(EgoVLPv2Config.tiny()), 1e-3, 0.01, 4, 4)  # no text groups
    with pytest.raises(ValueError, match="split_text"):
        build_scheduler(opt, 2, 20, text_freeze_steps=3)
