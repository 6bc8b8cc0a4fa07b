"""An `index` run interrupted (Ctrl-C, SIGTERM, an error) between commits lists the complete shards it wrote before
it stops: commits come every --commit-every windows across videos, and without that a stopped run would lose up to
that many finished windows of earlier videos."""

import json
import shutil

import pytest

from egovlp_deploy.runtime import IndexSettings, Runtime, build_index
from egovlp_deploy.runtime import index as index_module


@pytest.fixture(scope="module")
def rt(engines):
    return Runtime(engines)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_run_keeps_its_complete_shards(rt, video_root, tmp_path, monkeypatch, stop):
    videos = tmp_path / "videos"
    for uid in ("vid_a", "vid_b", "vid_c"):
        (videos / uid).mkdir(parents=True)
        shutil.copy2(video_root / uid / "0.mp4", videos / uid / "0.mp4")
    settings = IndexSettings(frames=4, window_sec=1.0, stride_sec=1.0, commit_every=100)  # no commit before the end
    encoded, calls = index_module._encoded_parts, []

    def stopping_at_the_third_video(runtime, pipe, path, *args):
        calls.append(path)
        if len(calls) == 3:
            raise stop("stopped")
        yield from encoded(runtime, pipe, path, *args)

    monkeypatch.setattr(index_module, "_encoded_parts", stopping_at_the_third_video)
    with pytest.raises(stop):
        build_index(tmp_path / "idx", [str(videos)], rt, settings, progress=False)
    listed = json.loads((tmp_path / "idx" / "index.json").read_text())["videos"]
    assert [v["uid"] for v in listed if v["done"]] == [p.parent.name for p in calls[:2]]
    assert all(v["done"] == v["windows"] for v in listed if v["done"])
    kept = sum(v["windows"] for v in listed if v["done"])
    monkeypatch.undo()
    again = build_index(tmp_path / "idx", [str(videos)], rt, settings, progress=False)
    assert kept and again["new_windows"] == again["windows"] - kept  # the kept windows are not encoded again
