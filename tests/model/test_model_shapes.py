"""The model at frame counts other than its checkpoint's (`model_at_frames`), in every dtype it may be held in."""

import copy
import json

import pytest
import torch

from egovlp_deploy.model.factory import model_at_frames
from official_format import random_tiny


@pytest.fixture(scope="module")
def tiny():
    return random_tiny(seed=5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_model_at_frames_keeps_the_dtype(tiny, dtype):
    """A half-precision model at another frame count stays half: it takes the same half clips as before."""
    low = copy.deepcopy(tiny).to(dtype)
    at8 = model_at_frames(low, 8)
    assert at8.dtype == dtype and all(p.dtype == dtype for p in at8.parameters())
    video = torch.randn(2, 8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = at8.encode_video(video.to(dtype)).float()
        want = model_at_frames(tiny, 8).encode_video(video)
    assert ((got - want).abs().max() / want.abs().max()).item() < 3e-2  # measured 7e-4 (fp16), 6e-3 (bf16)


@pytest.mark.parametrize("frames", [1, 3, 16])
def test_model_at_frames_runs_dual_and_fusion_at_any_count(tiny, frames):
    model = model_at_frames(tiny, frames)
    assert model.config.video.num_frames == frames and not model.training
    assert tiny.config.video.num_frames == 4  # the source model is untouched
    video = torch.randn(2, frames, 3, 32, 32, generator=torch.Generator().manual_seed(frames))
    ids = torch.tensor([[0, 11, 12, 2], [0, 13, 2, 1]])
    mask = ids.ne(1).long()
    with torch.no_grad():
        emb = model.encode_video(video)
        ref = model.fuse(video, ids, mask).vtm_logits
        model.set_attention_backend("sdpa")
        sdpa = model.fuse(video, ids, mask).vtm_logits
    assert emb.shape == (2, model.config.projection_dim) and torch.isfinite(emb).all()
    assert torch.allclose(sdpa, ref, rtol=1e-4, atol=1e-5)


def test_a_plan_entry_that_picks_triton_on_a_cpu_is_measured_again(tmp_path, monkeypatch):
    """A plan file whose entry for this CPU says "triton" (edited, or written under the Triton interpreter) would
    stop every call of that shape with "triton needs a CUDA device": the key is measured again instead."""
    from egovlp_deploy.model import attention as A
    from egovlp_deploy.model.attention_plan import AttentionPlan, read_plan_file, using

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    qkv = torch.randn(2, 1 + 3 * 4, 3 * 16, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "plan.json"

    def run():
        with torch.no_grad():
            return A.divided_attention_tokens(qkv, 2, 3, "time", 8**-0.5, "tuned")

    with using(AttentionPlan(path)):
        run()
    data = json.loads(path.read_text())
    data["entries"][0]["ms"]["triton"] = 0.001
    data["entries"][0]["pick"] = "triton"
    path.write_text(json.dumps(data))

    plan = AttentionPlan(path)
    with using(plan):
        out = run()
    assert torch.allclose(out, A.divided_attention_tokens(qkv, 2, 3, "time", 8**-0.5, "reference"), atol=1e-6)
    assert plan.measured == 1 and [e.pick for e in read_plan_file(path)] != ["triton"]


@pytest.mark.parametrize("source", ["random:tiny", "saved"])
def test_load_model_refuses_zero_frames(tiny, tmp_path, source):
    """frames=0 is not "the checkpoint's own" (None is): a caller computing 0 frames gets an error, not 4 frames."""
    from egovlp_deploy.config import ConfigError
    from egovlp_deploy.model.factory import load_model

    if source == "saved":
        source = str(tiny.save_pretrained(tmp_path / "tiny"))
    with pytest.raises(ConfigError, match=r"num_frames must be an integer in \[1, "):
        load_model(source, 0)
    assert load_model(source, None)[0].config.video.num_frames == 4
