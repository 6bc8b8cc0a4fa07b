"""The moment index: build/extend, search and re-rank, model identity, bad videos, and crash-safe resume."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from egovlp_deploy.runtime import IndexFileError, IndexSettings, MomentIndex, Runtime, build_index


def _settings(**kw):
    return IndexSettings(
        **{"frames": 4, "window_sec": 1.0, "stride_sec": 0.5, "prefixes": True, "commit_every": 2, **kw}
    )


def _videos(root):
    return [str(root / uid / "0.mp4") for uid in ("vid_a", "vid_b", "vid_c")]


def test_build_search_rerank(engines, video_root, tmp_path):
    rt = Runtime(engines)
    summary = build_index(tmp_path / "idx", _videos(video_root), rt, _settings(), progress=False)
    index = MomentIndex(tmp_path / "idx")
    assert len(index) == summary["windows"] == 5 + 4 + 3  # 1 s windows every 0.5 s over 3.0, 2.5, 2.0 s
    assert np.allclose(np.linalg.norm(index.embeddings, axis=1), 1, atol=1e-5)
    hits = index.search(rt, "#C C picks up the red cup", top=4)
    assert [h.rank for h in hits] == [1, 2, 3, 4] and all(h.end_sec > h.start_sec for h in hits)
    assert all(hits[i].score >= hits[i + 1].score for i in range(3))
    reranked = index.search(rt, "#C C picks up the red cup", top=4, rerank=6, rerank_score="vtm")
    assert all(h.vtm is not None for h in reranked)
    assert all(reranked[i].vtm >= reranked[i + 1].vtm for i in range(3))
    # the re-ranker's cached prefixes give the monolithic fusion scores of the same windows
    from egovlp_deploy.runtime import ClipPipeline, segment_windows

    text = rt.text_encoder.encode(["#C C picks up the red cup"])
    pipe = ClipPipeline(4, 32)
    for h in reranked[:2]:
        windows, _ = segment_windows(h.video, [(h.start_sec, h.end_sec, None)], 4)
        mono = rt.fusion.score_clips(pipe.clips(h.video, windows), text.input_ids, text.mask)
        assert abs(mono[0] - h.vtm) < 1e-5


def test_incremental_and_refuses_other_model(engines, engines_copy, video_root, tmp_path):
    rt = Runtime(engines)
    vids = _videos(video_root)
    build_index(tmp_path / "idx", vids[:1], rt, _settings(), progress=False)
    s = build_index(tmp_path / "idx", vids, rt, _settings(), progress=False)
    assert s["new_windows"] == 4 + 3 and s["videos"] == 3
    manifest = json.loads((engines_copy / "manifest.json").read_text())
    manifest["source_checkpoint"]["sha256"] = "f" * 64  # another model's engines
    (engines_copy / "manifest.json").write_text(json.dumps(manifest))
    other = Runtime(engines_copy)
    with pytest.raises(IndexFileError, match="another model"):
        build_index(tmp_path / "idx", vids, other, _settings(), progress=False)
    with pytest.raises(IndexFileError, match="another model"):
        MomentIndex(tmp_path / "idx").search(other, "a cup")
    with pytest.raises(IndexFileError, match="other settings"):
        build_index(tmp_path / "idx", vids, rt, _settings(window_sec=2.0), progress=False)


def test_bad_videos(engines, video_root, tmp_path):
    rt = Runtime(engines)
    with pytest.raises(ValueError, match="no video files to index: .*missing.mp4: no such file or folder"):
        build_index(tmp_path / "idx", [str(tmp_path / "missing.mp4")], rt, _settings(), progress=False)
    assert not (tmp_path / "idx").exists()
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    summary = build_index(tmp_path / "idx2", [str(corrupt)], rt, _settings(), progress=False)
    assert summary["windows"] == 0 and [f["path"] for f in summary["failed"]] == [str(corrupt)]
    assert summary["failed"][0]["reason"].startswith("not a readable video")


KILL_SCRIPT = """
import os, signal, sys
from egovlp_deploy.runtime import IndexSettings, Runtime, build_index
def die(n):
    if n >= int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: as a power cut or OOM kill
build_index(sys.argv[2], sys.argv[4:], Runtime(sys.argv[1]), IndexSettings(frames=4, window_sec=1.0, stride_sec=0.5,
            prefixes=True, commit_every=2), progress=False, on_commit=die)
"""


def test_killed_run_resumes_consistently(engines, video_root, tmp_path):
    vids = _videos(video_root)
    idx = tmp_path / "idx"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(engines), str(idx), "8", *vids],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    partial = MomentIndex(idx)  # readable as it is: index.json names only complete shards
    assert len(partial) == 9  # commits of 2 per video: 2, 4, 5 (vid_a), 7, 9 (vid_b): killed after 9
    (idx / "shards" / "00001-00099.safetensors").write_bytes(b"half a shard")  # an uncommitted leftover
    rt = Runtime(engines)
    s = build_index(idx, vids, rt, _settings(), progress=False)
    assert s["new_windows"] == 12 - 9
    assert not (idx / "shards" / "00001-00099.safetensors").exists()
    resumed = MomentIndex(idx)
    clean = build_index(tmp_path / "clean", vids, rt, _settings(), progress=False)
    fresh = MomentIndex(tmp_path / "clean")
    assert clean["windows"] == len(resumed) == 12
    np.testing.assert_allclose(resumed.embeddings, fresh.embeddings, atol=1e-6)
    np.testing.assert_array_equal(resumed.timestamps, fresh.timestamps)
    np.testing.assert_allclose(resumed.prefixes(list(range(12))), fresh.prefixes(list(range(12))), atol=1e-6)


def test_changed_video_is_reindexed(engines, video_root, tmp_path):
    import shutil

    from video_files import write_video

    rt = Runtime(engines)
    src = tmp_path / "v" / "clip.mp4"
    src.parent.mkdir()
    shutil.copy(video_root / "vid_c" / "0.mp4", src)
    build_index(tmp_path / "idx", [str(src)], rt, _settings(), progress=False)
    write_video(src, 30)  # replaced by a longer file
    s = build_index(tmp_path / "idx", [str(src)], rt, _settings(), progress=False)
    assert s["windows"] == 5 and len(MomentIndex(tmp_path / "idx")) == 5
    assert len(list((tmp_path / "idx" / "shards").iterdir())) == 3  # the old shards are gone


def test_progress_total_is_known_from_the_start(engines, video_root, tmp_path, capsys):
    """Every video is planned before any is encoded: the bar shows 12 clips from its first line, never 5/5 then
    9/9 as videos are reached."""
    import re

    build_index(tmp_path / "idx", _videos(video_root), Runtime(engines), _settings(), progress=True)
    err = capsys.readouterr().err
    totals = {int(m.group(1)) for m in re.finditer(r"index:[^\r\n]*?\d+/(\d+)", err)}
    assert totals == {12}, err


def test_ms_per_clip_is_steady_state(engines, video_root, tmp_path):
    """Each encoder's first batch of a run (session creation, first allocations) is not in ms_per_clip; a stage
    that ran only that batch is not listed."""
    import time

    rt = Runtime(engines)
    encode = rt.video_encoder.encode
    calls = []

    def slow_first_call(clips):
        if not calls:
            time.sleep(2.0)  # 1000 ms per clip of the first batch (2 clips): would dominate any average
        calls.append(len(clips))
        return encode(clips)

    rt.video_encoder.encode = slow_first_call
    summary = build_index(tmp_path / "idx", _videos(video_root), rt, _settings(), progress=False)
    assert len(calls) == 7 and summary["ms_per_clip"]["video_encode"] < 100  # commits of 2: 2+2+1, 2+2, 2+1
    assert set(summary["ms_per_clip"]) == {"decode", "preprocess", "video_encode", "video_prefix"}
    one_batch = build_index(tmp_path / "idx2", _videos(video_root)[2:], rt, _settings(commit_every=32), progress=False)
    assert "video_encode" not in one_batch["ms_per_clip"] and "decode" in one_batch["ms_per_clip"]


def test_search_names_videos_by_their_path_under_the_common_folder(engines, video_root, tmp_path, capsys):
    import shutil

    from egovlp_deploy.cli import main
    from egovlp_deploy.runtime.index import display_names

    for folder in ("a", "b"):
        (tmp_path / "videos" / folder).mkdir(parents=True)
        shutil.copy(video_root / "vid_c" / "0.mp4", tmp_path / "videos" / folder / "bikes.mp4")
    idx = str(tmp_path / "idx")
    assert main(["index", str(tmp_path / "videos"), "--engines", str(engines), "--out", idx, "--quiet"]) == 0
    assert "ms per clip (steady state" in capsys.readouterr().out
    assert main(["search", idx, "#C C opens the box", "--top", "6"]) == 0
    out = capsys.readouterr().out
    assert "a/bikes.mp4" in out and "b/bikes.mp4" in out
    assert main(["search", idx, "#C C opens the box", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["#C C opens the box"]
    assert {h["name"] for h in hits} == {"a/bikes.mp4", "b/bikes.mp4"}
    assert display_names(["/x/bikes.mp4", "/y/bikes.mp4"]) == {
        "/x/bikes.mp4": "/x/bikes.mp4",
        "/y/bikes.mp4": "/y/bikes.mp4",
    }  # only / in common
    assert display_names(["/data/v/one.mp4"]) == {"/data/v/one.mp4": "one.mp4"}
    # the chunk layout ROOT/<uid>/<n>.mp4: the folder is the video's name
    assert display_names(["/data/vid_a/0.mp4"]) == {"/data/vid_a/0.mp4": "vid_a/0.mp4"}
    assert display_names(["/data/vid_a/0.mp4", "/data/vid_a/1.mp4"]) == {
        "/data/vid_a/0.mp4": "vid_a/0.mp4",
        "/data/vid_a/1.mp4": "vid_a/1.mp4",
    }
    assert display_names(["/data/vid_a/0.mp4", "/data/vid_b/0.mp4"]) == {
        "/data/vid_a/0.mp4": "vid_a/0.mp4",
        "/data/vid_b/0.mp4": "vid_b/0.mp4",
    }


def test_a_truncated_file_is_indexed_as_far_as_it_decodes(engines, tmp_path):
    """A 'faststart' mp4 cut short lists frames its data no longer holds: the frames that decode are indexed and
    the summary says so (decord refuses such a file whole; 'auto' reads it with PyAV)."""
    import av

    whole = tmp_path / "whole.mp4"
    with av.open(str(whole), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for i in range(60):
            img = np.random.default_rng(i).integers(0, 256, (64, 64, 3), np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    summary = build_index(tmp_path / "idx", [str(cut)], Runtime(engines), _settings(), progress=False)
    assert summary["failed"] == [] and summary["succeeded"] == 1
    (note,) = summary["notes"]
    assert note["path"] == str(cut) and "truncated" in note["note"]
    ends = MomentIndex(tmp_path / "idx").timestamps[:, 1]
    assert 0 < len(ends) and ends.max() < 6.0  # the whole file would be 6 s
