"""`index` and `features` over real folder layouts with hostile files: every good file is processed, every bad one
is reported by name with a plain reason, and the exit status says so."""

import json
import os
import re
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from egovlp_deploy.cli import main
from egovlp_deploy.runtime.clip_pipeline import expand_inputs
from video_files import write_video


def write_audio_only(path):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile") / "videos"
    good = [write_video(root / "day1" / "walk.mp4", 20), write_video(root / "day2" / "cook.mp4", 24)]
    (root / "empty.mp4").write_bytes(b"")
    (root / "notes.mp4").write_text("this is a text file, not a video\n")
    write_audio_only(root / "voice.mp4")
    data = write_video(root / "src_truncated.mp4", 30).read_bytes()
    (root / "src_truncated.mp4").unlink()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (root / "readme.txt").write_text("not a video extension: ignored when a folder is given\n")
    latin1 = os.path.join(os.fsencode(root), b"caf\xe9.mp4")
    shutil.copy(write_video(root.parent / "tmp.mp4", 16), latin1)
    good.append(root / os.fsdecode(b"caf\xe9.mp4"))
    bad = {root / "empty.mp4", root / "notes.mp4", root / "voice.mp4"}
    return root, good, bad


def test_folders_globs_and_missing_paths(hostile, tmp_path):
    root, good, bad = hostile
    paths, failures = expand_inputs(
        [str(root), str(root / "day*" / "*.mp4"), str(tmp_path / "nope.mp4"), str(tmp_path / "*.mkv")]
    )
    assert set(paths) == set(good) | bad | {root / "truncated.mp4"}  # each once, readme.txt left out
    assert [f.reason for f in failures] == ["no such file or folder", "no file matches this pattern"]


def test_a_pattern_takes_its_video_files_or_else_every_file(tmp_path):
    """`in/**` over a folder that also holds a features output (`in/feats/x.json`, `x.safetensors`) takes the
    videos only, as a folder does; a pattern that matches no video file takes what it names (`*.dat`)."""
    root = tmp_path / "in"
    video = write_video(root / "x.mp4", 8)
    for name in ("feats/x.json", "feats/x.safetensors", "notes.txt", "raw/a.dat", "raw/b.dat"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("not a video")
    paths, failures = expand_inputs([str(root / "**")])
    assert paths == [video] and not failures
    paths, _ = expand_inputs([str(root / "raw" / "*.dat")])
    assert paths == [root / "raw" / "a.dat", root / "raw" / "b.dat"]


@pytest.mark.parametrize("command", ["index", "features"])
def test_good_files_are_processed_and_bad_ones_reported(engines, hostile, tmp_path, capsys, command):
    root, good, bad = hostile
    out = tmp_path / "out"
    args = [command, str(root), str(tmp_path / "missing.mp4"), "--engines", str(engines), "--out", str(out), "--json"]
    if command == "features":
        args += ["--frames", "8", "--stride", "8"]
    assert main(args) == 1  # some inputs failed
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    failed = {f["path"]: f["reason"] for f in summary["failed"]}
    for f in bad | {tmp_path / "missing.mp4"}:
        assert str(f) in failed, (f, failed)
        assert "Check failed" not in failed[str(f)] and "st_nb" not in failed[str(f)]  # plain words
        assert str(f) in captured.err
    assert all(str(g) not in failed for g in good)
    if command == "index":
        processed = {v["path"] for v in json.loads((out / "index.json").read_text())["videos"]}
        assert not {str(f.resolve()) for f in bad} & processed  # failed files leave no entry behind
    else:
        processed = {
            str(Path(p).resolve()) for p, name in summary["outputs"].items() if (out / f"{name}.json").is_file()
        }
    assert {str(g.resolve()) for g in good} <= processed
    truncated = root / "truncated.mp4"
    assert str(truncated) in failed or str(truncated.resolve()) in processed  # never dropped silently
    assert main(args + ["--allow-failures"]) == 0  # reported again, exit 0
    assert "could not be read" in capsys.readouterr().err


def test_nothing_readable_is_an_error(engines, tmp_path, capsys):
    assert main(["index", str(tmp_path / "nope"), "--engines", str(engines), "--out", str(tmp_path / "i")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "i").exists()


def test_segments_with_a_folder_and_a_video_without_rows(engines, video_root, tmp_path, capsys):
    """--segments matches the expanded files by uid; a video with no rows is reported, the others indexed."""
    rows = [
        "video_uid\tclip_start\tclip_end\tclip_text",
        "vid_a\t0.0\t1.5\t#C C opens the box",
        "vid_b\t0.5\t2.0\t#C C pulls the cup",
    ]
    (tmp_path / "segments.tsv").write_text("\n".join(rows) + "\n")
    args = [
        "index",
        str(video_root),
        "--segments",
        str(tmp_path / "segments.tsv"),
        "--engines",
        str(engines),
        "--out",
        str(tmp_path / "idx"),
        "--json",
    ]
    assert main(args) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["windows"] == 2 and summary["succeeded"] == 2
    assert [(os.path.basename(os.path.dirname(f["path"])), f["reason"]) for f in summary["failed"]] == [
        ("vid_c", "no segments given for this video")
    ]
    assert {v["uid"] for v in json.loads((tmp_path / "idx" / "index.json").read_text())["videos"]} == {"vid_a", "vid_b"}


@pytest.mark.parametrize(
    "rows, expected",
    [
        (["video_uid\tclip_start\tclip_end", "vid_a\t0.0\t1.5", "vid_b\tsoon\t2.0"], "line 3.*clip_start.*'soon'"),
        (["video_uid\tclip_start\tclip_end", "vid_a\t0.0\tnan"], "line 2.*clip_end.*not finite"),
        (["video_uid,clip_start,clip_end", "vid_a,0.0,1.5"], "line 1.*missing columns.*TAB-separated"),
        (["video_uid\tclip_start\tclip_end", "\t0.0\t1.5"], "line 2.*video_uid is empty"),
    ],
)
def test_a_bad_segments_file_is_one_line_naming_file_and_line(engines, video_root, tmp_path, capsys, rows, expected):
    """--segments is read by the data layer's EgoClip reader: a bad row stops the command before any video is read,
    with the file and the line in one message (exit 2), and nothing is written."""
    segments = tmp_path / "segments.tsv"
    segments.write_text("\n".join(rows) + "\n")
    args = ["index", str(video_root), "--segments", str(segments), "--engines", str(engines)]
    assert main(args + ["--out", str(tmp_path / "idx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(segments) in err and re.search(expected, err), err
    assert not (tmp_path / "idx").exists()
