"""The fusion encoder split at its first fused layer: cacheable video/text prefixes + the fused top layers."""

import pytest
import torch

from egovlp_deploy import InputError


def test_prefixes_recombine_to_fuse_and_mlm(tiny_model, tiny_inputs):
    video, ids, mask = tiny_inputs
    with torch.no_grad():
        whole = tiny_model.fuse(video, ids, mask)
        video_cls, text_hidden = tiny_model.fused_from_prefixes(
            tiny_model.fusion_video_prefix(video), tiny_model.text_prefix(ids, mask), mask
        )
        torch.testing.assert_close(video_cls, whole.video_cls, rtol=0, atol=0)
        torch.testing.assert_close(text_hidden, whole.text_hidden, rtol=0, atol=0)
        torch.testing.assert_close(tiny_model.vtm_head(video_cls, text_hidden), whole.vtm_logits, rtol=0, atol=0)
        torch.testing.assert_close(
            tiny_model.mlm_head(text_hidden), tiny_model.mlm_logits(video, ids, mask), rtol=0, atol=0
        )


def test_text_prefix_is_the_dual_text_state_below_the_fusion(tiny_model, tiny_inputs):
    _, ids, mask = tiny_inputs
    layers = tiny_model.text_model.encoder.layer
    last_unfused = layers[tiny_model.text_model.encoder.first_fused - 1]
    seen = []
    hook = last_unfused.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        tiny_model.encode_text(ids, mask)
        hook.remove()
        torch.testing.assert_close(tiny_model.text_prefix(ids, mask), seen[0], rtol=0, atol=0)


def test_one_video_prefix_serves_every_pairing(tiny_model, tiny_inputs):
    """What the trainer and a re-ranker do: compute each clip's prefix once, index it for many (clip, text) pairs."""
    video, ids, mask = tiny_inputs
    video_idx, text_idx = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        prefix = tiny_model.fusion_video_prefix(video)
        cls, text = tiny_model.fused_from_prefixes(
            prefix[video_idx], tiny_model.text_prefix(ids[text_idx], mask[text_idx]), mask[text_idx]
        )
        shared = tiny_model.vtm_head(cls, text)
        direct = tiny_model.fuse(video[video_idx], ids[text_idx], mask[text_idx]).vtm_logits
    torch.testing.assert_close(shared, direct, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(shared[0], shared[1])  # the pairings really differ


def test_prefix_shape_errors_name_the_problem(tiny_model, tiny_inputs):
    video, ids, mask = tiny_inputs
    with torch.no_grad():
        prefix, text = tiny_model.fusion_video_prefix(video), tiny_model.text_prefix(ids, mask)
        with pytest.raises(InputError, match="video_prefix must be"):
            tiny_model.fused_from_prefixes(prefix[:, :-1], text, mask)
        with pytest.raises(InputError, match="text_prefix must be"):
            tiny_model.fused_from_prefixes(prefix, text[..., :-1], mask)
        with pytest.raises(InputError, match="mismatch"):
            tiny_model.fused_from_prefixes(prefix[:1], text, mask)
