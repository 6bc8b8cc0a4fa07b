"""One index entry per file: a file reached by two paths (a hard link, a folder given twice through a symlinked
parent) is indexed once, in one run or across runs, while a copy (another inode) is another video; and `search`
against an index that an `index` run commits to meanwhile. Each result is checked against counts by hand (a video of
30 frames at 10 fps has 5 windows of 1 s every 0.5 s) or against a fresh index of the same files."""

import json
import os
import shutil

import numpy as np
import pytest

import egovlp_deploy.runtime.index as index_module
from egovlp_deploy.cli import main
from egovlp_deploy.runtime import IndexFileError, IndexSettings, MomentIndex, Runtime, build_index

WINDOWS = {"vid_a": 5, "vid_b": 4}  # 3.0 s and 2.5 s of video


def _settings(**kw):
    return IndexSettings(**{"frames": 4, "window_sec": 1.0, "stride_sec": 0.5, "commit_every": 2, **kw})


@pytest.fixture(scope="module")
def rt(engines):
    return Runtime(engines)


def _copy(video_root, dst, uid="vid_a"):
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(video_root / uid / "0.mp4", dst)  # the same bytes and modification time, another inode
    return dst


def _link(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.link(src, dst)
    return dst


def _pad(path, n=64):
    """Changes a video in place (a trailing mp4 `free` box, which players skip): another size, the same frames."""
    with open(path, "ab") as f:
        f.write(n.to_bytes(4, "big") + b"free" + bytes(n - 8))


def _moments_in_order(index):
    """[(video path, start, end)] of each row of the index, in row order."""
    return [
        (index.data["videos"][vi]["path"], *map(float, index.timestamps[r])) for r, (vi, *_) in enumerate(index.rows)
    ]


def _moments(index):
    """Every window of the index as (video path, start, end), sorted, with repeats."""
    return sorted(_moments_in_order(index))


def _notes(summary, text):
    return {n["path"]: n["note"] for n in summary["notes"] if text in n["note"]}


# -- one run --------------------------------------------------------------------------------------------------
def test_a_hard_link_in_the_same_run_is_indexed_once_and_a_copy_is_another_video(rt, video_root, tmp_path, capsys):
    """`index a/ b/ c/` where b/clip.mp4 is a hard link to a/clip.mp4 and c/clip.mp4 a byte-identical copy: the link
    is skipped with a note naming a/clip.mp4, the copy is indexed; search lists each moment once per file."""
    a = _copy(video_root, tmp_path / "v" / "a" / "clip.mp4")
    b = _link(a, tmp_path / "v" / "b" / "clip.mp4")
    c = _copy(video_root, tmp_path / "v" / "c" / "clip.mp4")
    idx = tmp_path / "idx"
    args = ["index", *(str(p.parent) for p in (a, b, c)), "--engines", str(rt.folder.path), "--out", str(idx)]
    assert main([*args, "--window", "1", "--stride", "0.5", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"note: {b}: the same file as {a.resolve()}" in err and "not indexed again" in err
    index = MomentIndex(idx)
    assert [v["path"] for v in index.data["videos"]] == [str(a.resolve()), str(c.resolve())]
    windows = [(s, s + 1.0) for s in (0.0, 0.5, 1.0, 1.5, 2.0)]
    assert _moments(index) == sorted((str(p.resolve()), *w) for p in (a, c) for w in windows)
    hits = index.search(rt, "C picks up the cup", top=100)
    assert sorted((h.video, h.start_sec, h.end_sec) for h in hits) == _moments(index)


def test_a_folder_given_twice_through_a_symlinked_parent_is_indexed_once(rt, video_root, tmp_path):
    """The same folder named directly and through a symlink to its parent, in one run and in the next: each video
    once, nothing encoded again."""
    real = tmp_path / "real"
    _copy(video_root, real / "v" / "vid_a" / "0.mp4")
    _copy(video_root, real / "v" / "vid_b" / "0.mp4", "vid_b")
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    idx = tmp_path / "idx"
    first = build_index(idx, [str(real / "v"), str(tmp_path / "alias" / "v")], rt, _settings(), progress=False)
    assert (first["videos"], first["windows"]) == (2, sum(WINDOWS.values()))
    again = build_index(idx, [str(tmp_path / "alias" / "v")], rt, _settings(), progress=False)
    assert (again["videos"], again["windows"], again["new_windows"]) == (2, sum(WINDOWS.values()), 0)


# -- across runs ----------------------------------------------------------------------------------------------
def test_a_hard_link_in_a_later_run_is_not_indexed_again(rt, video_root, tmp_path):
    """A hard link indexed after its file was indexed under another path: skipped with a note; once the file
    changes (written through the link), it is encoded again under the path it is indexed under."""
    a = _copy(video_root, tmp_path / "v" / "a" / "clip.mp4")
    idx = tmp_path / "idx"
    build_index(idx, [str(a)], rt, _settings(), progress=False)
    b = _link(a, tmp_path / "v" / "b" / "clip.mp4")
    summary = build_index(idx, [str(b)], rt, _settings(), progress=False)
    assert (summary["videos"], summary["windows"], summary["new_windows"]) == (1, 5, 0)
    assert list(_notes(summary, "the same file as")) == [str(b)]
    assert str(a.resolve()) in summary["notes"][0]["note"]
    _pad(b)  # a, the same file, changes with it
    changed = build_index(idx, [str(tmp_path / "v")], rt, _settings(), progress=False)
    assert (changed["videos"], changed["windows"], changed["new_windows"]) == (1, 5, 5)
    data = json.loads((idx / "index.json").read_text())
    assert [(v["path"], v["uid"], v["fingerprint"]["size"]) for v in data["videos"]] == [
        (str(a.resolve()), "clip", a.stat().st_size)
    ]


def test_the_indexed_path_deleted_while_a_hard_link_remains(rt, video_root, tmp_path):
    """The path a file is indexed under deleted, a hard link to it kept: the link is that video moved, nothing is
    encoded again; of two gone entries with its content (a deleted copy too) the one of its inode moves."""
    c = _copy(video_root, tmp_path / "v" / "c" / "clip.mp4")
    a = _copy(video_root, tmp_path / "v" / "a" / "clip.mp4")
    idx = tmp_path / "idx"
    build_index(idx, [str(c), str(a)], rt, _settings(), progress=False)  # the copy's entry first
    b = _link(a, tmp_path / "v" / "b" / "clip.mp4")
    a.unlink()
    c.unlink()
    summary = build_index(idx, [str(b)], rt, _settings(), progress=False)
    assert (summary["windows"], summary["new_windows"]) == (10, 0)
    assert _notes(summary, "moved from") == {str(b): f"moved from {a.resolve()}: its moments are kept"}
    assert list(_notes(summary, "file is gone")) == [str(c.resolve())]
    data = json.loads((idx / "index.json").read_text())
    assert [v["path"] for v in data["videos"]] == [str(c.resolve()), str(b.resolve())]


def test_an_index_without_inodes_takes_them_on_the_next_run(rt, video_root, tmp_path):
    """An index.json whose fingerprints lack device and inode: the next run records the files' (os.stat), encodes
    nothing again, and then knows a hard link for the file it is."""
    a = _copy(video_root, tmp_path / "v" / "a" / "clip.mp4")
    idx = tmp_path / "idx"
    build_index(idx, [str(a)], rt, _settings(), progress=False)
    data = json.loads((idx / "index.json").read_text())
    for v in data["videos"]:
        for k in ("dev", "inode"):
            v["fingerprint"].pop(k, None)
    (idx / "index.json").write_text(json.dumps(data))
    b = _link(a, tmp_path / "v" / "b" / "clip.mp4")
    summary = build_index(idx, [str(b), str(a)], rt, _settings(), progress=False)
    assert (summary["videos"], summary["windows"], summary["new_windows"]) == (1, 5, 0)
    assert list(_notes(summary, "the same file as")) == [str(b)]
    st = os.stat(a)
    fingerprint = json.loads((idx / "index.json").read_text())["videos"][0]["fingerprint"]
    assert (fingerprint["dev"], fingerprint["inode"]) == (st.st_dev, st.st_ino)


def test_two_entries_of_one_file_become_one(rt, video_root, tmp_path):
    """An index holding one file twice (two paths indexed while they were two files, or by a version that did not
    tell hard links apart): the next run keeps one entry, drops the other and its shards, encodes nothing."""
    a = _copy(video_root, tmp_path / "v" / "a" / "clip.mp4")
    b = _copy(video_root, tmp_path / "v" / "b" / "clip.mp4")
    idx = tmp_path / "idx"
    build_index(idx, [str(tmp_path / "v")], rt, _settings(), progress=False)
    assert len(MomentIndex(idx)) == 10
    b.unlink()
    _link(a, b)  # the same bytes and time as the entry recorded
    summary = build_index(idx, [str(tmp_path / "v")], rt, _settings(), progress=False)
    assert (summary["videos"], summary["windows"], summary["new_windows"]) == (1, 5, 0)
    assert list(_notes(summary, "second entry")) == [str(b.resolve())]
    index = MomentIndex(idx)
    assert _moments(index) == sorted((str(a.resolve()), s, s + 1.0) for s in (0.0, 0.5, 1.0, 1.5, 2.0))
    listed = {s["file"] for v in index.data["videos"] for s in v["shards"]}
    assert {f"shards/{p.name}" for p in (idx / "shards").iterdir()} == listed


# -- search while `index` writes ------------------------------------------------------------------------------
def _race(monkeypatch, rt, idx, videos, changes):
    """`index` runs between search's read of index.json and its read of a shard: at the first shard of a video, for
    each of `changes` (uids) in turn, that video's file changes and `index` runs over the folder (it drops the
    video's shards and encodes it again under new ones)."""
    real = index_module.read_shard
    pending = list(changes)
    writing = []  # the `index` run reads shards too: those reads are its own

    def racing(directory, data, video, shard, *a, **kw):
        if pending and shard["start"] == 0 and not writing:
            _pad(videos / pending.pop(0) / "0.mp4")
            writing.append(True)
            build_index(idx, [str(videos)], rt, _settings(), progress=False)
            writing.pop()
        return real(directory, data, video, shard, *a, **kw)

    monkeypatch.setattr(index_module, "read_shard", racing)


def _videos(video_root, dst):
    for uid in WINDOWS:
        _copy(video_root, dst / uid / "0.mp4", uid)
    return dst


def test_search_reads_the_index_again_when_index_commits_meanwhile(rt, video_root, tmp_path, monkeypatch):
    """A shard deleted by an `index` commit after search read index.json: search reads the new index.json and
    answers from it, the same moments as a fresh index of the same files."""
    videos = _videos(video_root, tmp_path / "v")
    idx = tmp_path / "idx"
    build_index(idx, [str(videos)], rt, _settings(), progress=False)
    _race(monkeypatch, rt, idx, videos, ["vid_a"])
    index = MomentIndex(idx)
    monkeypatch.undo()
    build_index(tmp_path / "fresh", [str(videos)], rt, _settings(), progress=False)
    reference = MomentIndex(tmp_path / "fresh")
    assert _moments(index) == _moments(reference)
    rows = {m: index.embeddings[r] for r, m in enumerate(_moments_in_order(index))}
    for r, m in enumerate(_moments_in_order(reference)):
        np.testing.assert_allclose(rows[m], reference.embeddings[r], atol=1e-6)


def test_search_says_the_index_is_being_written_when_it_keeps_changing(rt, video_root, tmp_path, monkeypatch, capsys):
    """index.json changes again during the second read: one error saying an `index` run is writing the index (not
    that the index is damaged)."""
    videos = _videos(video_root, tmp_path / "v")
    idx = tmp_path / "idx"
    build_index(idx, [str(videos)], rt, _settings(), progress=False)
    _race(monkeypatch, rt, idx, videos, ["vid_a", "vid_b"])
    assert main(["search", str(idx), "a cup", "--engines", str(rt.folder.path)]) == 2
    err = capsys.readouterr().err
    assert "`egovlp-deploy index` run is writing the index" in err and "search again" in err
    assert "rerun the same" not in err
    monkeypatch.undo()
    assert len(MomentIndex(idx)) == sum(WINDOWS.values())  # the index itself is sound


def test_rerank_after_index_committed_says_so(rt, video_root, tmp_path):
    """A search loaded, then an `index` run drops the shards it read (a video changed): re-ranking, which reads the
    fusion prefixes from the shards, says the index changed since it was read, not that it is damaged."""
    videos = _videos(video_root, tmp_path / "v")
    idx = tmp_path / "idx"
    build_index(idx, [str(videos)], rt, _settings(prefixes=True), progress=False)
    index = MomentIndex(idx)
    for uid in WINDOWS:
        _pad(videos / uid / "0.mp4")
    build_index(idx, [str(videos)], rt, _settings(prefixes=True), progress=False)
    with pytest.raises(IndexFileError, match="changed since this search read it") as caught:
        index.search(rt, "a cup", top=3, rerank=9)
    assert "rerun the same" not in str(caught.value)
