"""The moment index at a user's scale, shown at the smallest size that tells: a rerun over a large folder does work
in proportion to what changed (files planned, index.json rewrites), and search ranks identical clips alike however
large the index. Work is counted (calls, writes), never timed."""

import json
import os
import shutil

import numpy as np
import pytest

import egovlp_deploy.checkpoint as checkpoint
import egovlp_deploy.runtime.index as index_module
from egovlp_deploy.path_text import utf8_path
from egovlp_deploy.runtime import IndexSettings, MomentIndex, Runtime, build_index
from egovlp_deploy.runtime.clip_pipeline import PLANNER_VERSION
from video_files import write_numbered, write_video


def _settings(**kw):
    return IndexSettings(**{"frames": 4, "window_sec": 1.0, "stride_sec": 1.0, "commit_every": 100, **kw})


@pytest.fixture(scope="module")
def rt(engines):
    return Runtime(engines)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Six videos of 1.0 to 1.5 s, written once (clip0: one window of 1 s, the others two); each test copies them."""
    src = tmp_path_factory.mktemp("scale_src")
    return [write_video(src / f"clip{i}.mp4", 10 + i) for i in range(6)]


def _folder(clips, dst):
    dst.mkdir(parents=True)
    for c in clips:
        shutil.copy2(c, dst / c.name)
    return dst


def _rows(index):
    """{(video path, start, end): embedding} of every window in the index."""
    return {
        (index.data["videos"][vi]["path"], *map(float, index.timestamps[r])): index.embeddings[r]
        for r, (vi, _, _, _) in enumerate(index.rows)
    }


def _same_as_fresh(rt, idx, videos, fresh):
    build_index(fresh, [str(videos)], rt, _settings(), progress=False)
    got, want = _rows(MomentIndex(idx)), _rows(MomentIndex(fresh))
    assert sorted(got) == sorted(want)
    for key, emb in want.items():
        np.testing.assert_allclose(got[key], emb, atol=1e-6)


@pytest.fixture
def count_plans(monkeypatch):
    planned = []
    real = index_module.plan_windows

    def counting(path, *a, **kw):
        planned.append(os.path.basename(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(index_module, "plan_windows", counting)
    return planned


@pytest.fixture
def count_index_writes(monkeypatch):
    writes = []
    real = checkpoint.atomic_write_bytes

    def counting(path, data):
        if os.path.basename(path) == "index.json":
            writes.append(len(data))
        return real(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", counting)
    return writes


def _listed_shards(idx):
    data = json.loads((idx / "index.json").read_text())
    return sorted(s["file"] for v in data["videos"] for s in v["shards"])


def _shards_on_disk(idx):
    return sorted(f"shards/{p.name}" for p in (idx / "shards").iterdir())


# -- rerunning `index` over a folder ----------------------------------------------------------------------------
def test_a_rerun_plans_only_the_videos_that_changed(rt, clips, tmp_path, count_plans):
    """Planning a video reads the whole file (its packets, to list its frames): a rerun over a folder of thousands
    of indexed videos read every byte of every one of them to find the few that changed. Now an unchanged video
    (size, modification time and content sample as recorded, all its windows indexed) is not planned; a changed,
    new or damaged one is, and the index is the same as a fresh one of the folder."""
    videos = _folder(clips, tmp_path / "videos")
    idx = tmp_path / "idx"
    build_index(idx, [str(videos)], rt, _settings(), progress=False)
    assert len(count_plans) == 6
    count_plans.clear()
    again = build_index(idx, [str(videos)], rt, _settings(), progress=False)
    assert count_plans == [] and again["new_windows"] == 0 and again["succeeded"] == 6 and not again["notes"]

    write_numbered(videos / "clip2.mp4", 10)  # replaced by another recording
    shutil.copy2(clips[0], videos / "new.mp4")  # a copy (another file) added
    data = json.loads((idx / "index.json").read_text())
    (idx / next(v for v in data["videos"] if v["uid"] == "clip4")["shards"][0]["file"]).unlink()  # lost by hand
    summary = build_index(idx, [str(videos)], rt, _settings(), progress=False)
    assert sorted(count_plans) == ["clip2.mp4", "clip4.mp4", "new.mp4"]
    assert (summary["videos"], summary["new_windows"], summary["succeeded"]) == (7, 1 + 2 + 1, 7)
    assert any("clip4" in n["path"] and "again" in n["note"] for n in summary["notes"])
    _same_as_fresh(rt, idx, videos, tmp_path / "fresh")


def test_videos_planned_by_another_planner_are_planned_again(rt, clips, tmp_path, count_plans):
    """The skip trusts the windows recorded: an index whose videos were planned by another version of the planner
    (or before the version was recorded) plans every video once more, so that a change to the windows a file gets
    reaches it, and records this version for the next rerun to skip them again."""
    videos = _folder(clips, tmp_path / "videos")
    idx = tmp_path / "idx"
    build_index(idx, [str(videos)], rt, _settings(), progress=False)
    data = json.loads((idx / "index.json").read_text())
    assert data["planner"] == PLANNER_VERSION
    del data["planner"]  # an index written before the version was recorded
    (idx / "index.json").write_text(json.dumps(data))
    count_plans.clear()
    build_index(idx, [str(videos)], rt, _settings(), progress=False)
    assert len(count_plans) == 6
    count_plans.clear()
    build_index(idx, [str(videos)], rt, _settings(), progress=False)
    assert count_plans == []


def test_an_interrupted_video_is_planned_to_resume(rt, tmp_path, count_plans):
    """A video with windows still to encode (a killed run) is planned on the rerun even though its file is as
    recorded, and resumes where it stopped."""
    video = write_video(tmp_path / "videos" / "long.mp4", 40)  # 4 windows
    idx = tmp_path / "idx"
    build_index(idx, [str(video)], rt, _settings(commit_every=2), progress=False)
    data = json.loads((idx / "index.json").read_text())
    data["videos"][0]["shards"] = data["videos"][0]["shards"][:1]
    data["videos"][0]["done"] = data["videos"][0]["shards"][0]["count"]
    (idx / "index.json").write_text(json.dumps(data))
    count_plans.clear()
    summary = build_index(idx, [str(video)], rt, _settings(commit_every=2), progress=False)
    assert count_plans == ["long.mp4"] and summary["new_windows"] == 2 and summary["windows"] == 4


# -- taking many videos out of the index ------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["changed", "pruned", "gone, shards lost"])
def test_many_videos_out_of_the_index_cost_one_rewrite(rt, clips, tmp_path, count_index_writes, how):
    """Each video taken out of the index (its file changed, --prune of deleted files, the lost shards of deleted
    files uncommitted) rewrote and fsynced the whole index.json once: changing or pruning half of a 10,000-video
    index wrote it 5,000 times (gigabytes). Now they are taken out together at the run's next commit, and their
    shards are deleted after it; nothing else is lost."""
    videos = _folder(clips, tmp_path / "videos")
    idx = tmp_path / "idx"
    build_index(idx, [str(videos)], rt, _settings(), progress=False)
    data = json.loads((idx / "index.json").read_text())
    out = ["clip1", "clip2", "clip3", "clip5"]
    for v in data["videos"]:
        if v["uid"] not in out:
            continue
        path = videos / f"{v['uid']}.mp4"
        if how == "changed":  # the same bytes written anew (a sync tool that does not keep times)
            content = path.read_bytes()
            path.unlink()
            path.write_bytes(content)
        else:
            path.unlink()
            if how.endswith("shards lost"):
                (idx / v["shards"][0]["file"]).unlink()
    count_index_writes.clear()
    summary = build_index(idx, [str(videos)], rt, _settings(), progress=False, prune=how == "pruned")
    assert len(count_index_writes) == 1
    assert _shards_on_disk(idx) == _listed_shards(idx)
    index = MomentIndex(idx)
    if how == "changed":
        assert summary["new_windows"] == 4 * 2
        _same_as_fresh(rt, idx, videos, tmp_path / "fresh")
    elif how == "pruned":
        assert summary["pruned"] == 4 and len(index) == 1 + 2
        _same_as_fresh(rt, idx, videos, tmp_path / "fresh")
    else:
        assert summary["videos"] == 6 and len(index) == 1 + 2
        assert sum("taken out of the index" in n["note"] for n in summary["notes"]) == 4


# -- search -----------------------------------------------------------------------------------------------------
def _static_video_index(rt, tmp_path, rows: int):
    """An index of one long still video: `rows` windows whose embeddings are all the same (a camera left on a
    table), written in the index's own format (shards of 32 rows, as `index` writes them)."""
    idx = tmp_path / "idx"
    build_index(idx, [str(write_video(tmp_path / "v" / "still.mp4", 10))], rt, _settings(), progress=False)
    data = json.loads((idx / "index.json").read_text())
    video = data["videos"][0]
    row = MomentIndex(idx).embeddings[:1]
    for s in video["shards"]:
        (idx / s["file"]).unlink()
    video["shards"] = []
    for part, start in enumerate(range(0, rows, 32)):
        count = min(32, rows - start)
        name = f"shards/{video['number']:05d}-{part:05d}.safetensors"
        times = np.stack([np.arange(start, start + count), np.arange(start, start + count) + 1.0], 1)
        tensors = {"embeddings": np.repeat(row, count, 0), "timestamps": times.astype(np.float64)}
        index_module._save_shard(idx / name, tensors, {"model_id": data["model_id"], "video": utf8_path(video["path"])})
        video["shards"].append({"file": name, "start": start, "count": count})
    video["windows"] = video["done"] = rows
    (idx / "index.json").write_text(json.dumps(data))
    return MomentIndex(idx)


@pytest.mark.parametrize("rows", [7, 1003])
def test_identical_clips_score_alike_and_rank_in_index_order(rt, tmp_path, rows):
    """Identical clips scored differently in their last bits depending on where they lay in the index (a BLAS
    matrix-vector product sums rows in position-dependent blocks), so a still video's windows ranked in a
    shuffled order and a clip's score changed with the size of the index. Now every row is summed alike: equal
    clips tie exactly, rank by time, and score what the same clip scores alone."""
    index = _static_video_index(rt, tmp_path, rows)
    hits = index.search(rt, "a cup on a table", top=rows)
    assert len({h.score for h in hits}) == 1
    assert [h.start_sec for h in hits] == [float(i) for i in range(rows)]
    q = rt.text_encoder.encode(["a cup on a table"]).embedding[0]
    alone = index.scores(q / np.linalg.norm(q))
    assert (alone == np.float32(hits[0].score)).all()
    assert [h.start_sec for h in index.search(rt, "a cup on a table", top=3)] == [0.0, 1.0, 2.0]


def test_top_k_selection_is_the_stable_full_sort():
    """Search picks the top k in O(N) (a partition, then a sort of the rows at least as good as the k-th), with
    the same result as a stable sort of all scores, ties with the k-th included."""
    rng = np.random.default_rng(0)
    for trial in range(2000):
        n = int(rng.integers(1, 80))
        scores = (rng.integers(0, 4, n) if trial % 2 else rng.standard_normal(n)).astype(np.float32)
        k = int(rng.integers(1, n + 3))
        np.testing.assert_array_equal(index_module._top_rows(scores, k), np.argsort(-scores, kind="stable")[:k])


def test_loading_an_index_holds_its_embeddings_once(rt, tmp_path):
    """Search read every shard into a list and then concatenated them: loading an index took twice its
    embeddings at the peak (32 GiB for a million clips of 4096 dims). Now the shards are read into arrays of the
    size index.json states: the peak is the embeddings once, plus the rows' bookkeeping."""
    import tracemalloc

    _static_video_index(rt, tmp_path, 4096)
    tracemalloc.start()
    try:
        index = MomentIndex(tmp_path / "idx")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(index) == 4096
    assert peak < 1.6 * index.embeddings.nbytes


def test_a_new_video_never_writes_over_a_shard_index_json_still_lists(rt, tmp_path, monkeypatch):
    """An entry dropped in a run (here b.mp4, now a hard link to a.mp4: a second entry of a's file) leaves
    index.json at the next commit; a new video of the run (c.mp4) took the dropped entry's shard number and wrote
    its shard over one index.json still listed: a search at that moment, or the index after a crash, was refused
    as written by two runs at once."""
    videos = tmp_path / "videos"
    a = write_video(videos / "a.mp4", 20)
    b = write_video(videos / "b.mp4", 30)
    idx = tmp_path / "idx"
    settings = IndexSettings(frames=4, window_sec=1.0, stride_sec=1.0, commit_every=100)
    build_index(idx, [str(videos)], rt, settings, progress=False)
    b.unlink()
    os.link(a, b)
    write_video(videos / "c.mp4", 15)
    real, errors = index_module._save_shard, []

    def save_then_search(path, tensors, metadata):
        real(path, tensors, metadata)
        try:
            MomentIndex(idx)  # what a search sees between two commits, or the index after a crash here
        except index_module.IndexFileError as exc:
            errors.append(str(exc))

    monkeypatch.setattr(index_module, "_save_shard", save_then_search)
    build_index(idx, [str(videos)], rt, settings, progress=False)
    assert errors == []
    assert {os.path.basename(v["path"]) for v in MomentIndex(idx).data["videos"]} == {"a.mp4", "c.mp4"}


def test_an_index_json_listing_terabytes_of_clips_is_an_index_error(rt, tmp_path):
    """The embeddings are allocated from index.json's counts before any shard is read: a damaged count of 10^12
    raised numpy's bare MemoryError ("Unable to allocate 931 TiB")."""
    videos = tmp_path / "videos"
    write_video(videos / "a.mp4", 20)
    idx = tmp_path / "idx"
    build_index(idx, [str(videos)], rt, IndexSettings(frames=4, window_sec=1.0, stride_sec=1.0), progress=False)
    data = json.loads((idx / "index.json").read_text())
    video = data["videos"][0]
    video["shards"][0]["count"] = video["windows"] = video["done"] = 10**12  # consistent with each other
    (idx / "index.json").write_text(json.dumps(data))
    with pytest.raises(index_module.IndexFileError, match="more than this machine's memory holds"):
        MomentIndex(idx)
