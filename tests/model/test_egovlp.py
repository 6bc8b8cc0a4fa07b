"""The public model API: shapes, the dual/fusion switch, fusion semantics, and bad-input errors."""

import dataclasses

import pytest
import torch
from conftest import make_inputs

from egovlp_deploy import EgoVLPv2, EgoVLPv2Config, InputError
from egovlp_deploy.compute import compute_report
from official_format import randomize_

CROSS_MARKERS = ("_i2t", "crossattention_t2i")


def test_output_shapes(tiny_model, tiny_config, tiny_inputs):
    video, ids, mask = tiny_inputs
    with torch.no_grad():
        assert tiny_model.encode_video(video).shape == (2, tiny_config.projection_dim)
        assert tiny_model.encode_text(ids, mask).shape == (2, tiny_config.projection_dim)
        out = tiny_model.fuse(video, ids, mask)
        assert out.video_cls.shape == (2, tiny_config.video.width)
        assert out.text_hidden.shape == (2, ids.shape[1], tiny_config.text.hidden_size)
        assert out.vtm_logits.shape == (2, 2)
        assert tiny_model.mlm_logits(video, ids, mask).shape == (2, ids.shape[1], tiny_config.text.vocab_size)


def test_projection_layouts():
    small = EgoVLPv2(dataclasses.replace(EgoVLPv2Config.tiny(), projection="small", projection_dim=32))
    keys = set(small.state_dict())
    assert {"txt_proj.1.weight", "vid_proj.0.weight"} <= keys and "txt_proj.0.weight" not in keys
    assert isinstance(
        small.txt_proj[0], torch.nn.ReLU
    )  # ReLU before the text Linear, as in the official small projection
    big = EgoVLPv2(EgoVLPv2Config.tiny())
    assert big.txt_proj[0].bias is None and big.txt_proj[2].bias is not None


def _cross_attention_calls(model, fn):
    calls = []
    hooks = [
        m.register_forward_hook(lambda *a, n=name: calls.append(n))
        for name, m in model.named_modules()
        if name.split(".")[-1].endswith(CROSS_MARKERS)
    ]
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in hooks:
            h.remove()
    return calls


def test_dual_mode_runs_no_cross_attention(tiny_model, tiny_inputs):
    video, ids, mask = tiny_inputs
    assert _cross_attention_calls(tiny_model, lambda: tiny_model.encode_video(video)) == []
    assert _cross_attention_calls(tiny_model, lambda: tiny_model.encode_text(ids, mask)) == []
    assert len(_cross_attention_calls(tiny_model, lambda: tiny_model.fuse(video, ids, mask))) > 0


def test_dual_mode_gmacs_contain_no_cross_attention():
    report = compute_report(EgoVLPv2Config.tiny(), text_length=7)
    assert report.cross_attention_gmacs["dual video"] == 0
    assert report.cross_attention_gmacs["dual text"] == 0
    assert report.cross_attention_gmacs["fusion (VTM)"] > 0


def test_base_model_counts_match_the_hand_computed_spec():
    report = compute_report(EgoVLPv2Config.base(), text_length=15)
    # the official model's counts: video 128.35 M (cross 14.18 M), text 138.23 M (cross 14.17 M), total 381.6 M
    assert round(report.params["video tower"] / 1e6, 2) == 128.35
    assert round(report.params["video tower, cross-attention"] / 1e6, 2) == 14.18
    assert round(report.params["text tower"] / 1e6, 2) == 138.23
    assert round(report.params["text tower, cross-attention"] / 1e6, 2) == 14.17
    assert round(report.params["total"] / 1e6, 1) == 381.6
    # ViT-B/16 at 224 is 17.6 GMACs per frame; the divided model adds the temporal pass and the global CLS
    assert 4 * 17.5 < report.gmacs["dual video"] < 4 * 24
    assert report.cross_attention_gmacs["dual video"] == 0


def _zero_gates(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("alpha_i2t", "alpha_t2i")):
                p.zero_()


def test_fusion_with_zero_gates_and_dual_cls_reproduces_dual_video(tiny_model, tiny_inputs):
    video, ids, mask = tiny_inputs
    with torch.no_grad():
        gated = tiny_model.fuse(video, ids, mask).video_cls
        _zero_gates(tiny_model)
        tiny_model.cls_token.copy_(tiny_model.video_model.cls_token)
        tiny_model.norm.load_state_dict(tiny_model.video_model.norm.state_dict())
        tiny_model.norm.eps = tiny_model.video_model.norm.eps
        fused = tiny_model.fuse(video, ids, mask).video_cls
        dual = tiny_model.encode_video(video, project=False)
    torch.testing.assert_close(fused, dual, rtol=0, atol=1e-6)
    assert not torch.allclose(gated, dual, atol=1e-3)  # with the gates open, text changes the video features


def test_zero_text_gates_make_fused_text_the_dual_text(tiny_model, tiny_inputs):
    video, ids, mask = tiny_inputs
    with torch.no_grad():
        for layer in tiny_model.text_model.encoder.layer:
            if layer.has_cross:
                layer.alpha_t2i.zero_()
        fused = tiny_model.fuse(video, ids, mask).text_hidden
        from egovlp_deploy.model.attention import extended_attention_mask

        dual = tiny_model.text_model(ids, extended_attention_mask(mask, torch.float32))
    torch.testing.assert_close(fused, dual, rtol=0, atol=1e-6)
    torch.testing.assert_close(tiny_model.encode_text(ids, mask, project=False), dual[:, 0])


def test_fusion_update_is_simultaneous(tiny_model, tiny_inputs):
    """Layer l of each tower reads the other's layer l-1 output: the top layer of one tower cannot reach the other."""
    video, ids, mask = tiny_inputs
    with torch.no_grad():
        before = tiny_model.fuse(video, ids, mask)
        top_video, top_text = tiny_model.video_model.blocks[-1], tiny_model.text_model.encoder.layer[-1]
        top_video.mlp.fc2.weight.mul_(3.0)
        after_video_change = tiny_model.fuse(video, ids, mask)
        top_text.output.dense.weight.mul_(3.0)
        after_both = tiny_model.fuse(video, ids, mask)
    torch.testing.assert_close(after_video_change.text_hidden, before.text_hidden, rtol=0, atol=0)
    assert not torch.allclose(after_video_change.video_cls, before.video_cls)
    torch.testing.assert_close(after_both.video_cls, after_video_change.video_cls, rtol=0, atol=0)


def test_heads_follow_the_official_wiring(tiny_model, tiny_inputs):
    video, ids, mask = tiny_inputs
    m = tiny_model
    with torch.no_grad():
        out = m.fuse(video, ids, mask)
        text_feat = torch.tanh(m.cross_modal_text_pooler.dense(m.cross_modal_text_transform(out.text_hidden[:, 0])))
        video_feat = torch.tanh(m.cross_modal_video_pooler.dense(m.cross_modal_video_transform(out.video_cls)))
        torch.testing.assert_close(out.vtm_logits, m.itm_score.fc(torch.cat((text_feat, video_feat), -1)))
        h = m.cross_modal_text_transform(out.text_hidden)
        t = m.mlm_score.transform
        expected = m.mlm_score.decoder(t.LayerNorm(torch.nn.functional.gelu(t.dense(h)))) + m.mlm_score.bias
        torch.testing.assert_close(m.mlm_logits(video, ids, mask), expected)
    assert m.mlm_score.transform.LayerNorm.eps == 1e-12 and m.norm.eps == 1e-6


def test_padding_does_not_change_results(tiny_model, tiny_config):
    video, ids, mask = make_inputs(tiny_config, batch=2, length=9)
    n = int(mask[1].sum())
    with torch.no_grad():
        padded = tiny_model.fuse(video[1:], ids[1:], mask[1:])
        trimmed = tiny_model.fuse(video[1:], ids[1:, :n], mask[1:, :n])
        torch.testing.assert_close(padded.video_cls, trimmed.video_cls, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(padded.text_hidden[:, :n], trimmed.text_hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            tiny_model.encode_text(ids[1:], mask[1:]),
            tiny_model.encode_text(ids[1:, :n], mask[1:, :n]),
            rtol=1e-5,
            atol=1e-5,
        )


def test_batch_items_are_independent(tiny_model, tiny_inputs):
    video, ids, mask = tiny_inputs
    with torch.no_grad():
        both = tiny_model.fuse(video, ids, mask).vtm_logits
        first = tiny_model.fuse(video[:1], ids[:1], mask[:1]).vtm_logits
    torch.testing.assert_close(both[:1], first, rtol=1e-5, atol=1e-6)


def test_any_frame_count_builds_and_runs():
    for frames in (1, 3, 16):
        config = EgoVLPv2Config.tiny(num_frames=frames)
        model = randomize_(EgoVLPv2(config), seed=1).eval()
        video, ids, mask = make_inputs(config, batch=1)
        with torch.no_grad():
            assert model.fuse(video, ids, mask).vtm_logits.shape == (1, 2)


# -- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,match",
    [
        ((2, 3, 3, 32, 32), "frames"),
        ((2, 4, 1, 32, 32), "channels"),
        ((2, 4, 3, 32, 24), "resolution"),
        ((2, 4, 3, 64, 64), "resolution"),
        ((4, 3, 32, 32), r"\(B, F, C, H, W\)"),
    ],
)
def test_bad_video_shapes(tiny_model, shape, match):
    with pytest.raises(InputError, match=match):
        tiny_model.encode_video(torch.zeros(shape))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float64])
def test_bad_video_dtypes(tiny_model, dtype):
    with pytest.raises(InputError, match="dtype"):
        tiny_model.encode_video(torch.zeros(1, 4, 3, 32, 32, dtype=dtype))


def test_bad_text(tiny_model, tiny_config, tiny_inputs):
    video, ids, mask = tiny_inputs
    too_long = tiny_config.text.max_text_length + 1
    long_ids = torch.zeros(1, too_long, dtype=torch.long)
    with pytest.raises(InputError, match="position table"):
        tiny_model.encode_text(long_ids, torch.ones_like(long_ids))
    tiny_model.encode_text(long_ids[:, :-1], torch.ones_like(long_ids[:, :-1]))  # the longest allowed text runs
    with pytest.raises(InputError, match="integer"):
        tiny_model.encode_text(ids.float(), mask)
    with pytest.raises(InputError, match="attention_mask shape"):
        tiny_model.encode_text(ids, mask[:, :-1])
    bad = ids.clone()
    bad[0, 1] = tiny_config.text.vocab_size
    with pytest.raises(InputError, match="token ids"):
        tiny_model.encode_text(bad, mask)
    with pytest.raises(InputError, match="torch.Tensor"):
        tiny_model.encode_text(ids.tolist(), mask)


def test_mismatched_batches(tiny_model, tiny_inputs):
    video, ids, mask = tiny_inputs
    with pytest.raises(InputError, match="batch sizes differ"):
        tiny_model.fuse(video[:1], ids, mask)
    with pytest.raises(InputError, match="batch sizes differ"):
        tiny_model.mlm_logits(video, ids[:1], mask[:1])
