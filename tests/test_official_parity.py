"""Parity with the official EgoVLPv2 code at the paper's size, pinned by golden outputs the official code produced.

See golden/official_base.json for how they were made. Each case rebuilds the same deterministic weights, writes
them in the official checkpoint format, loads them through `from_official_checkpoint`, and compares every output
within 1e-4 relative error (max |ours - official| / max |official|).
"""

import json
from pathlib import Path

import pytest
import torch

from egovlp_deploy import EgoVLPv2, EgoVLPv2Config
from official_format import deterministic_state_dict, golden_inputs, write_official_checkpoint

GOLDEN = json.loads((Path(__file__).parent / "golden" / "official_base.json").read_text())
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    out = {}
    for projection, seed in GOLDEN["seeds"].items():
        with torch.device("meta"):
            skeleton = EgoVLPv2(EgoVLPv2Config.base(num_frames=4, projection=projection))
        path = tmp_path_factory.mktemp("official") / f"{projection}.pth"
        write_official_checkpoint(deterministic_state_dict(skeleton, seed), path, max_positions=514)
        out[projection] = path
    return out


def _check(name, ours: torch.Tensor, ref: dict):
    assert list(ours.shape) == ref["shape"], name
    flat = ours.detach().double().reshape(-1)
    scale = ref["max_abs"]
    picked = flat[torch.tensor(ref["index"])]
    err = (picked - torch.tensor(ref["values"], dtype=torch.float64)).abs().max().item() / scale
    assert err < REL_TOL, f"{name}: relative error {err:.2e} at sampled positions"
    assert abs(flat.abs().max().item() - scale) / scale < REL_TOL, f"{name}: max |x| differs"
    assert abs(flat.abs().sum().item() - ref["abs_sum"]) / ref["abs_sum"] < REL_TOL, f"{name}: sum |x| differs"
    assert abs(flat.sum().item() - ref["sum"]) / ref["abs_sum"] < REL_TOL, f"{name}: sum differs"


@pytest.mark.parametrize(
    "case,projection,frames,batch",
    [
        ("big_4frames", "big", 4, 2),
        ("small_4frames", "small", 4, 2),
        ("big_16frames_from_4", "big", 16, 1),
    ],
)
def test_matches_official_outputs(official_files, case, projection, frames, batch):
    model = EgoVLPv2.from_official_checkpoint(official_files[projection], num_frames=frames)
    assert model.config.projection == projection and model.config.video.num_frames == frames
    video, ids, mask = golden_inputs(frames, batch)
    ref = GOLDEN["cases"][case]
    with torch.no_grad():
        _check("video_embeds", model.encode_video(video), ref["video_embeds"])
        _check("text_embeds", model.encode_text(ids, mask), ref["text_embeds"])
        out = model.fuse(video, ids, mask)
        _check("fuse_video_cls", out.video_cls, ref["fuse_video_cls"])
        _check("fuse_text_hidden", out.text_hidden, ref["fuse_text_hidden"])
        _check("vtm_logits", out.vtm_logits, ref["vtm_logits"])
        _check("mlm_logits", model.mlm_logits(video, ids, mask), ref["mlm_logits"])
