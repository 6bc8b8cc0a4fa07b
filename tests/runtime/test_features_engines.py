"""`features` records the engines (backend, precision) its outputs come from: a rerun on other engines writes the
video again instead of skipping it, and a video killed part-way is not continued with another engine's windows."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from egovlp_deploy.runtime.engines import Runtime
from egovlp_deploy.runtime.features import extract_features
from video_files import write_video


class Killed(Exception):
    """Stands in for a kill after the first committed part."""


def _run(engines, video, out, backend, **kw):
    runtime = Runtime(engines, backend=backend, warmup=False)
    return extract_features([str(video)], runtime, out, frames=8, stride=8, progress=False, batch=2, **kw)


@pytest.fixture
def video(tmp_path):
    return write_video(tmp_path / "v" / "take.mp4", 48)  # 6 windows of 8 frames


def test_other_engines_are_not_done(engines, video, tmp_path):
    out = tmp_path / "feats"
    assert _run(engines, video, out, "onnxruntime")["written"] == 1
    again = _run(engines, video, out, "torch")
    assert again["written"] == 1 and again["skipped"] == 0
    meta = json.loads((out / "take.json").read_text())
    assert meta["settings"]["engines"] == {"backend": "torch", "precision": "fp32"}
    fresh = tmp_path / "fresh"
    _run(engines, video, fresh, "torch")
    assert np.array_equal(
        load_file(str(out / "take.safetensors"))["features"], load_file(str(fresh / "take.safetensors"))["features"]
    )
    assert _run(engines, video, out, "torch")["skipped"] == 1


def test_a_killed_video_is_not_continued_on_other_engines(engines, video, tmp_path):
    out = tmp_path / "feats"

    def kill(_committed):
        raise Killed

    with pytest.raises(Killed):
        _run(engines, video, out, "onnxruntime", commit_every=2, on_commit=kill)
    assert (out / ".partial" / "take" / "progress.json").is_file()  # the first part is committed
    result = _run(engines, video, out, "torch", commit_every=2)
    assert result["resumed"] == 0 and result["encoded"] == 6
    fresh = tmp_path / "fresh"
    _run(engines, video, fresh, "torch", commit_every=2)
    ours, reference = (load_file(str(f / "take.safetensors"))["features"] for f in (out, fresh))
    assert np.array_equal(ours, reference)  # not the onnxruntime windows of the killed run followed by torch's
