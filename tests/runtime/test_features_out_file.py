"""`features --out` naming an existing file: a clear error naming it, the file untouched."""

import pytest

from egovlp_deploy.runtime.engines import Runtime
from egovlp_deploy.runtime.features import extract_features
from video_files import write_video


def test_out_naming_a_file_is_a_clear_error(engines, tmp_path):
    video = write_video(tmp_path / "v" / "take.mp4", 16)
    target = tmp_path / "features.txt"
    target.write_text("mine")
    with pytest.raises(ValueError, match="features.txt: exists and is not a folder"):
        extract_features([str(video)], Runtime(engines, warmup=False), target, frames=8, stride=8, progress=False)
    assert target.read_text() == "mine"
