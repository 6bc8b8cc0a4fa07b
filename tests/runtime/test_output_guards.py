"""Output folders against concurrent and careless use: one writer per index or features folder, settings refused
before anything is written (NaN, absurd strides), a shard listed under the wrong video, a hand-damaged index.json,
a features folder holding the user's own files of the same name, and counts that must be >= 1."""

import json
import os

import pytest

from egovlp_deploy.cli import main
from egovlp_deploy.folder_lock import exclusive_writer
from egovlp_deploy.runtime import IndexFileError, IndexSettings, MomentIndex, Runtime, build_index
from egovlp_deploy.runtime.features import extract_features


def _settings(**kw):
    return IndexSettings(**{"frames": 4, "window_sec": 1.0, "stride_sec": 0.5, "commit_every": 2, **kw})


@pytest.fixture(scope="module")
def rt(engines):
    return Runtime(engines)


def test_a_second_writer_of_an_index_is_refused_and_the_first_one_finishes(rt, video_root, tmp_path):
    """Two runs on one --out used to name their shards from their own copy of index.json and overwrite each
    other's: the index then listed one video's embeddings under another's name."""
    idx = tmp_path / "idx"
    idx.mkdir()
    with exclusive_writer(idx, "index", IndexFileError):  # another process's run, in progress
        with pytest.raises(IndexFileError, match="another process is writing this index now"):
            build_index(idx, [str(video_root / "vid_b" / "0.mp4")], rt, _settings(), progress=False)
    assert list(idx.iterdir()) == []  # the refused run wrote nothing
    build_index(idx, [str(video_root / "vid_b" / "0.mp4")], rt, _settings(), progress=False)
    with exclusive_writer(idx, "index", IndexFileError), pytest.raises(IndexFileError, match="another process"):
        build_index(idx, [str(video_root / "vid_a" / "0.mp4")], rt, _settings(), progress=False)
    assert [v["uid"] for v in MomentIndex(idx).data["videos"]] == ["vid_b"]


def test_the_lock_is_per_folder_and_released(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    with exclusive_writer(a, "index", IndexFileError), exclusive_writer(b, "index", IndexFileError):
        pass
    with exclusive_writer(a, "index", IndexFileError):  # released on leaving the block
        pass


def test_a_shard_listed_under_another_video_is_not_read_as_its_own(rt, video_root, tmp_path):
    idx = tmp_path / "idx"
    for uid in ("vid_a", "vid_b"):
        build_index(idx, [str(video_root / uid / "0.mp4")], rt, _settings(), progress=False)
    data = json.loads((idx / "index.json").read_text())
    a, b = data["videos"]
    # what two concurrent runs left: vid_a's entry lists vid_b's first shard (same row count)
    a["shards"][0]["file"] = b["shards"][0]["file"]
    (idx / "index.json").write_text(json.dumps(data))
    with pytest.raises(IndexFileError, match=r"listed as a shard of .*vid_a.* but written for .*vid_b"):
        MomentIndex(idx).search(rt, "a cup", top=3)
    # rerunning the same index command repairs it: vid_a's windows are encoded again from that shard on
    summary = build_index(idx, [str(video_root / "vid_a" / "0.mp4")], rt, _settings(), progress=False)
    assert summary["new_windows"] == a["done"] and summary["notes"]
    index = MomentIndex(idx)
    assert len(index) == a["done"] + b["done"]


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda d: d.pop("videos"), "videos"),
        (lambda d: d.update(videos="x"), "videos"),
        (lambda d: d.update(model_id=None), "model_id"),
        (lambda d: d["videos"][0].update(path=7), r"videos\[0\].path"),
        (lambda d: d["videos"][0]["shards"][0].pop("count"), r"videos\[0\].shards\[0\].count"),
        (lambda d: d["videos"][0].update(done=999), r"videos\[0\] says 999 of"),
        (lambda d: d.update(embed_dim=True), "embed_dim"),
    ],
)
def test_a_damaged_index_json_is_one_clear_error(rt, video_root, tmp_path, capsys, change, field):
    idx = tmp_path / "idx"
    build_index(idx, [str(video_root / "vid_c" / "0.mp4")], rt, _settings(), progress=False)
    data = json.loads((idx / "index.json").read_text())
    change(data)
    (idx / "index.json").write_text(json.dumps(data))
    with pytest.raises(IndexFileError, match=field):
        MomentIndex(idx)
    for argv in (["info", str(idx)], ["search", str(idx), "a cup", "--engines", str(rt.folder.path)]):
        assert main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and "index file is damaged" in err[0], err


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("--window", "nan", "finite"),
        ("--stride", "inf", "finite"),
        ("--stride", "1e-9", "at least 0.001"),
        ("--window", "0", "at least 0.001"),
        ("--stride", "-1", "at least 0.001"),
        ("--batch", "0", "must be 1 or more"),
        ("--commit-every", "0", "must be 1 or more"),
    ],
)
def test_bad_window_settings_are_refused_before_the_folder_is_made(
    engines, video_root, tmp_path, capsys, option, value, message
):
    """`--window nan` used to loop forever after recording NaN in index.json, and `--window 0` recorded 0 before
    failing, so the corrected command was refused as 'other settings'."""
    out = tmp_path / "idx"
    args = ["index", str(video_root / "vid_a" / "0.mp4"), "--engines", str(engines), "--out", str(out), "--quiet"]
    with pytest.raises(SystemExit) as exc:
        main([*args, option, value])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()
    assert main(args) == 0  # the corrected command runs


@pytest.mark.parametrize("window,stride", [(float("nan"), 1.0), (2.0, 1e-9), (0.0, 1.0)])
def test_build_index_checks_its_settings_before_writing(rt, video_root, tmp_path, window, stride):
    out = tmp_path / "idx"
    with pytest.raises(ValueError, match="window|stride"):
        build_index(out, [str(video_root / "vid_a" / "0.mp4")], rt, _settings(window_sec=window, stride_sec=stride))
    assert not out.exists()


def test_features_never_overwrite_the_users_files_of_the_same_name(rt, video_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "vid_a_0.json").write_text('{"my": "annotations"}')
    (out / "vid_a_0.safetensors").write_bytes(b"precious")
    (out / "vid_b_0.features.npy").write_bytes(b"mine too")
    videos = [str(video_root / "vid_a" / "0.mp4"), str(video_root / "vid_b" / "0.mp4")]
    summary = extract_features(videos, rt, out, frames=8, stride=8, progress=False)
    assert (out / "vid_a_0.json").read_text() == '{"my": "annotations"}'
    assert (out / "vid_a_0.safetensors").read_bytes() == b"precious"
    assert (out / "vid_b_0.features.npy").read_bytes() == b"mine too"
    names = summary["outputs"]
    assert names[videos[0]].startswith("vid_a_0-") and names[videos[1]].startswith("vid_b_0-")
    # a rerun finds its outputs under the same names and skips them
    again = extract_features(videos, rt, out, frames=8, stride=8, progress=False)
    assert again["outputs"] == names and again["skipped"] == 2


def test_features_output_killed_before_its_sidecar_keeps_its_name(rt, video_root, tmp_path):
    """The tensors are written before the sidecar: the safetensors header names its source, so a run killed
    between the two is continued under the same name, not taken for a user's file."""
    out = tmp_path / "out"
    video = str(video_root / "vid_a" / "0.mp4")
    first = extract_features([video], rt, out, frames=8, stride=8, progress=False)
    name = first["outputs"][video]
    os.remove(out / f"{name}.json")
    again = extract_features([video], rt, out, frames=8, stride=8, progress=False)
    assert again["outputs"][video] == name and again["written"] == 1
    assert sorted(p.name for p in out.iterdir()) == [f"{name}.json", f"{name}.safetensors"]


def test_npy_features_killed_before_their_sidecar_keep_their_name(rt, video_root, tmp_path, monkeypatch):
    """.npy files have no header to name their source: the progress record does, until the sidecar is written."""
    from egovlp_deploy import checkpoint

    out = tmp_path / "out"
    video = str(video_root / "vid_a" / "0.mp4")
    write = checkpoint.atomic_write_bytes

    def killed_at_the_sidecar(path, data):
        if path.parent == out and path.suffix == ".json":
            raise KeyboardInterrupt
        write(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", killed_at_the_sidecar)
    with pytest.raises(KeyboardInterrupt):
        extract_features([video], rt, out, frames=8, stride=8, fmt="npy", progress=False)
    monkeypatch.setattr(checkpoint, "atomic_write_bytes", write)
    assert (out / "vid_a_0.features.npy").is_file() and not (out / "vid_a_0.json").exists()
    again = extract_features([video], rt, out, frames=8, stride=8, fmt="npy", progress=False)
    assert again["outputs"][video] == "vid_a_0" and again["written"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["vid_a_0.features.npy", "vid_a_0.json", "vid_a_0.timestamps.npy"]


def test_a_second_features_writer_is_refused(rt, video_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with exclusive_writer(out, "features folder", ValueError), pytest.raises(ValueError, match="another process"):
        extract_features([str(video_root / "vid_a" / "0.mp4")], rt, out, frames=8, stride=8, progress=False)


@pytest.mark.parametrize("value", ["0", "-1", "-111"])
def test_mcq_max_questions_must_be_positive(engines, video_root, mcq_json, capsys, value):
    """A negative count used to slice questions off the end ([:-1]) and report the accuracy of the rest."""
    with pytest.raises(SystemExit) as exc:
        main(
            ["mcq", str(mcq_json), "--video-root", str(video_root), "--engines", str(engines), "--max-questions", value]
        )
    assert exc.value.code == 2 and "must be 1 or more" in capsys.readouterr().err


def test_answer_mcq_refuses_a_negative_count(rt, video_root, mcq_json):
    from egovlp_deploy.runtime.mcq import answer_mcq

    with pytest.raises(ValueError, match="max_questions"):
        answer_mcq(mcq_json, video_root, rt, max_questions=-1, progress=False)
    assert answer_mcq(mcq_json, video_root, rt, max_questions=1, progress=False)["questions"] == 1


def test_gone_videos_are_noted_and_pruned_on_request(rt, video_root, tmp_path):
    import shutil

    videos = tmp_path / "videos"
    videos.mkdir()
    for uid in ("vid_b", "vid_c"):
        shutil.copy(video_root / uid / "0.mp4", videos / f"{uid}.mp4")
    idx = tmp_path / "idx"
    build_index(idx, [str(videos)], rt, _settings(), progress=False)
    b_shards = [s["file"] for s in MomentIndex(idx).data["videos"][0]["shards"]]
    (videos / "vid_b.mp4").unlink()  # deleted (a moved file is found again: test_index_wild.py)
    summary = build_index(idx, [str(videos)], rt, _settings(), progress=False)
    gone = [n for n in summary["notes"] if "the file is gone" in n["note"]]
    assert [n["path"] for n in gone] == [str((videos / "vid_b.mp4").resolve())] and summary["pruned"] == 0
    assert len(MomentIndex(idx).data["videos"]) == 2  # still searchable until pruned

    summary = build_index(idx, [str(videos)], rt, _settings(), progress=False, prune=True)
    assert summary["pruned"] == 1 and summary["new_windows"] == 0
    assert sorted(v["uid"] for v in MomentIndex(idx).data["videos"]) == ["vid_c"]
    assert not any((idx / f).exists() for f in b_shards)


def test_a_chunk_of_the_egoclip_layout_is_named_by_its_folder(rt, video_root, tmp_path):
    """ROOT/<uid>/1.mp4 was indexed as uid '1' (only chunk 0 was recognised), unlike --segments and features."""
    import shutil

    (tmp_path / "root" / "kitchen").mkdir(parents=True)
    shutil.copy(video_root / "vid_c" / "0.mp4", tmp_path / "root" / "kitchen" / "1.mp4")
    build_index(tmp_path / "idx", [str(tmp_path / "root")], rt, _settings(), progress=False)
    assert [v["uid"] for v in MomentIndex(tmp_path / "idx").data["videos"]] == ["kitchen"]


def test_segments_outside_a_video_are_left_out_with_a_note(rt, video_root, tmp_path):
    """One mistyped segment used to drop every valid segment of its video from the index."""
    video = str(video_root / "vid_a" / "0.mp4")  # 3.0 s
    segments = {video: [(0.0, 1.0, "in"), (50.0, 51.0, "outside"), (1.0, 2.0, "in too")]}
    settings = _settings(mode="segments", window_sec=0.0, stride_sec=0.0)
    summary = build_index(tmp_path / "idx", [video], rt, settings, segments=segments, progress=False)
    assert summary["windows"] == 2 and not summary["failed"]
    assert any(
        "1 of 3 segments are outside the video" in n["note"] and "[50.0, 51.0]" in n["note"] for n in summary["notes"]
    )
    assert MomentIndex(tmp_path / "idx").data["videos"][0]["labels"] == ["in", "in too"]
    only_outside = {video: [(50.0, 51.0, "x"), (60.0, 61.0, "y")]}
    summary = build_index(tmp_path / "idx2", [video], rt, settings, segments=only_outside, progress=False)
    assert summary["windows"] == 0 and "all 2 segments are outside the video" in summary["failed"][0]["detail"]
