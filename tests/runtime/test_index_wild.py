"""The moment index as a user keeps one for months: videos moved, renamed, deleted or replaced between runs, shards
deleted by hand, an index extended with another export, and thousands of small videos. Each result is checked
against an independent computation (a fresh index of the same files, counts by hand)."""

import json
import os
import shutil

import numpy as np
import pytest

from egovlp_deploy.cli import main
from egovlp_deploy.runtime import IndexSettings, MomentIndex, Runtime, build_index
from video_files import write_numbered, write_video


def _settings(**kw):
    return IndexSettings(**{"frames": 4, "window_sec": 1.0, "stride_sec": 0.5, "commit_every": 2, **kw})


@pytest.fixture(scope="module")
def rt(engines):
    return Runtime(engines)


def _folder(video_root, dst, uids=("vid_a", "vid_b")):
    for uid in uids:
        (dst / uid).mkdir(parents=True)
        shutil.copy2(video_root / uid / "0.mp4", dst / uid / "0.mp4")
    return dst


def _rows(index):
    """{(video path, start, end): embedding} of every window in the index."""
    return {
        (index.data["videos"][vi]["path"], *map(float, index.timestamps[r])): index.embeddings[r]
        for r, (vi, _, _, _) in enumerate(index.rows)
    }


# -- videos that move -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["mv", "copy then delete", "mv, index from before the content sample"])
def test_a_moved_folder_keeps_its_moments_once(rt, video_root, tmp_path, how):
    """The videos folder renamed (or copied elsewhere with new modification times and the original deleted) and
    `index` rerun on the new path: each video is found again, nothing is encoded again, no moment is listed twice
    and every hit names a file that is there."""
    old = _folder(video_root, tmp_path / "videos")
    idx = tmp_path / "idx"
    first = build_index(idx, [str(old)], rt, _settings(), progress=False)
    assert first["windows"] == 5 + 4
    if how.endswith("content sample"):  # an index.json written before the sample was recorded
        data = json.loads((idx / "index.json").read_text())
        for v in data["videos"]:
            del v["fingerprint"]["sample_sha256"]
        (idx / "index.json").write_text(json.dumps(data))
    new = tmp_path / "renamed"
    if how == "copy then delete":
        shutil.copytree(old, new, copy_function=shutil.copyfile)  # new modification times
        shutil.rmtree(old)
    else:
        old.rename(new)
    summary = build_index(idx, [str(new)], rt, _settings(), progress=False)
    assert (summary["videos"], summary["windows"], summary["new_windows"]) == (2, 9, 0)
    assert sum("moved from" in n["note"] for n in summary["notes"]) == 2
    assert not any("file is gone" in n["note"] for n in summary["notes"])
    index = MomentIndex(idx)
    build_index(tmp_path / "fresh", [str(new)], rt, _settings(), progress=False)
    reference = MomentIndex(tmp_path / "fresh")
    assert sorted(_rows(index)) == sorted(_rows(reference))  # the same windows, under the new paths only
    for key, emb in _rows(reference).items():
        np.testing.assert_allclose(_rows(index)[key], emb, atol=1e-6)
    hits = index.search(rt, "C picks up the cup", top=100)
    assert len(hits) == 9 and all(os.path.exists(h.video) and str(new) in h.video for h in hits)
    again = build_index(idx, [str(new)], rt, _settings(), progress=False)  # the moved entries are ordinary now
    assert again["new_windows"] == 0 and not again["notes"]


def _same_size_pair(a, b):
    """Pads two mp4 files to one size with a trailing `free` box (which players skip)."""
    target = max(a.stat().st_size, b.stat().st_size) + 16
    for p in (a, b):
        pad = target - p.stat().st_size
        with open(p, "ab") as f:
            f.write(pad.to_bytes(4, "big") + b"free" + bytes(pad - 8))


def test_a_file_replaced_by_another_of_the_same_size_and_time_is_indexed_again(rt, tmp_path):
    """Another recording copied over a file with the same size and modification time (a camera that reuses its
    file names, a sync tool that keeps times): its windows are encoded again, not answered with the old file's."""
    clip, other = tmp_path / "v" / "clip.mp4", tmp_path / "other" / "clip.mp4"
    write_video(clip, 20)
    write_numbered(other, 20)
    _same_size_pair(clip, other)
    stat = clip.stat()
    idx = tmp_path / "idx"
    build_index(idx, [str(clip)], rt, _settings(), progress=False)
    shutil.copyfile(other, clip)
    os.utime(clip, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (clip.stat().st_size, clip.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    summary = build_index(idx, [str(clip)], rt, _settings(), progress=False)
    assert summary["new_windows"] == 3
    build_index(tmp_path / "fresh", [str(other)], rt, _settings(), progress=False)
    np.testing.assert_allclose(MomentIndex(idx).embeddings, MomentIndex(tmp_path / "fresh").embeddings, atol=1e-6)


def test_shards_of_a_deleted_video_deleted_by_hand(rt, video_root, tmp_path, capsys):
    """A user deletes a video and its shards: search names the shard and says to rerun `index`; that rerun takes
    the lost windows out (the file is not there to encode them again), and search answers from the others."""
    videos = _folder(video_root, tmp_path / "videos")
    idx = tmp_path / "idx"
    build_index(idx, [str(videos)], rt, _settings(), progress=False)
    data = json.loads((idx / "index.json").read_text())
    vid_b = next(v for v in data["videos"] if v["uid"] == "vid_b")
    shutil.rmtree(videos / "vid_b")
    (idx / vid_b["shards"][0]["file"]).unlink()
    assert main(["search", str(idx), "a cup", "--engines", str(rt.folder.path)]) == 2
    assert "missing shard of" in capsys.readouterr().err
    summary = build_index(idx, [str(videos)], rt, _settings(), progress=False)
    note = next(n["note"] for n in summary["notes"] if "vid_b" in n["path"])
    assert "file is gone" in note and "windows 0-3 are taken out of the index" in note
    index = MomentIndex(idx)
    assert len(index) == 5 and {h.uid for h in index.search(rt, "a cup", top=100)} == {"vid_a"}
    assert main(["search", str(idx), "a cup", "--engines", str(rt.folder.path)]) == 0


# -- exports --------------------------------------------------------------------------------------------------
def test_an_index_extended_with_another_export_says_so(rt, engines_copy, video_root, tmp_path, capsys):
    """Extended with another export of the same model, the index records which export encoded which clips; `info`
    lists both and `search` notes the mix whichever of the two runs it."""
    manifest = json.loads((engines_copy / "manifest.json").read_text())
    manifest["created"] = "2001-01-01T00:00:00+00:00"  # the same model exported again
    (engines_copy / "manifest.json").write_text(json.dumps(manifest))
    other = Runtime(engines_copy)
    assert other.model_id == rt.model_id and other.folder.manifest_sha256 != rt.folder.manifest_sha256
    idx = tmp_path / "idx"
    build_index(idx, [str(video_root / "vid_a" / "0.mp4")], rt, _settings(), progress=False)
    build_index(idx, [str(video_root / "vid_b" / "0.mp4")], other, _settings(), progress=False)
    assert main(["info", str(idx), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    shas = [(e["engines_manifest_sha256"], e["windows"]) for e in d["exports"]]
    assert shas == [(rt.folder.manifest_sha256, 5), (other.folder.manifest_sha256, 4)]
    assert main(["info", str(idx)]) == 0
    assert f"extended with  {engines_copy.resolve()}" in capsys.readouterr().out
    for engines in (rt.folder.path, engines_copy):
        assert main(["search", str(idx), "a cup", "--engines", str(engines)]) == 0
        assert "holds the clip embeddings of 2 exports" in capsys.readouterr().err
    build_index(idx, [str(video_root / "vid_c" / "0.mp4")], rt, _settings(), progress=False)  # the first again
    assert main(["info", str(idx), "--json"]) == 0
    assert [e["windows"] for e in json.loads(capsys.readouterr().out)["exports"]] == [5 + 3, 4]


# -- scale ----------------------------------------------------------------------------------------------------
def test_index_json_is_not_rewritten_per_small_video(rt, tmp_path, monkeypatch):
    """Many videos of one window each: index.json is written once per --commit-every windows (and at the end), not
    once per video; each write re-encodes only the entries that changed. Building an index of n such videos thus
    costs O(n) JSON work, not O(n^2) (at 10,000 videos one rewrite took about half a second)."""
    import egovlp_deploy.checkpoint as checkpoint
    import egovlp_deploy.runtime.index as index_module

    videos = [write_video(tmp_path / "v" / f"clip{i:02d}.mp4", 10) for i in range(12)]  # 1 s: one window each
    writes = []
    real_write = checkpoint.atomic_write_bytes

    def counting(path, data):
        if os.path.basename(path) == "index.json":
            writes.append(path)
        return real_write(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", counting)
    encoded = []
    real_dumps = json.dumps

    def counting_dumps(obj, *a, **kw):
        if isinstance(obj, dict) and "shards" in obj:
            encoded.append(obj["path"])
        elif isinstance(obj, dict):
            encoded.extend(v["path"] for v in obj.get("videos", []))  # a whole index.json at once
        return real_dumps(obj, *a, **kw)

    monkeypatch.setattr(index_module.json, "dumps", counting_dumps)
    summary = build_index(tmp_path / "idx", [str(v) for v in videos], rt, _settings(commit_every=4), progress=False)
    monkeypatch.undo()
    assert summary["windows"] == 12
    assert len(writes) == 1 + 12 // 4  # the marker, then a commit per 4 windows
    assert len(encoded) == 12  # each entry once
    data = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert [v["done"] for v in data["videos"]] == [1] * 12 and len(MomentIndex(tmp_path / "idx")) == 12


def test_index_writer_encodes_only_changed_entries(tmp_path, monkeypatch):
    from egovlp_deploy.runtime.index import _IndexWriter

    data = {"format": "f", "videos": [{"path": f"/v/{i}.mp4", "shards": [], "done": 0} for i in range(3000)]}
    writer = _IndexWriter(tmp_path / "index.json", data)
    writer.write()
    assert json.loads((tmp_path / "index.json").read_text()) == data
    calls = []
    real_dumps = json.dumps
    monkeypatch.setattr(json, "dumps", lambda obj, *a, **kw: calls.append(obj) or real_dumps(obj, *a, **kw))
    data["videos"][7]["done"] = 3
    writer.touch(data["videos"][7])
    data["videos"].append({"path": "/v/new.mp4", "shards": [], "done": 0})
    data["updated"] = "now"
    writer.write()
    monkeypatch.undo()
    assert [c.get("path") for c in calls if "shards" in c] == ["/v/7.mp4", "/v/new.mp4"]
    assert json.loads((tmp_path / "index.json").read_text()) == data


def test_search_says_which_videos_found_changed_or_went_since_they_were_indexed(rt, video_root, tmp_path, capsys):
    """Search answers from the index, whatever the path holds now: a hit whose file was deleted or rewritten since
    it was indexed is said so on stderr (one stat per video found), and an untouched index says nothing."""
    videos = _folder(video_root, tmp_path / "videos")
    idx = tmp_path / "idx"
    build_index(idx, [str(videos)], rt, _settings(), progress=False)
    argv = ["search", str(idx), "a cup", "--top", "100", "--engines", str(rt.folder.path)]
    assert main(argv) == 0
    assert "changed or are gone" not in capsys.readouterr().err
    shutil.rmtree(videos / "vid_b")
    with open(videos / "vid_a" / "0.mp4", "ab") as f:
        f.write(b"\0")  # rewritten: another size
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "note: 2 of the videos found changed or are gone since they were indexed (" in err
    assert "vid_a" in err and "vid_b" in err


def test_hit_ranks_stay_aligned_past_99():
    from egovlp_deploy.runtime.commands import format_hits
    from egovlp_deploy.runtime.index import Hit

    hits = [Hit(rank, "v.mp4", "v", "v.mp4", 0.0, 1.0, 0.5, 0.5) for rank in (9, 99, 100)]
    lines = format_hits("q", hits).splitlines()[1:]
    assert len({line.index(".") for line in lines}) == 1
