"""The moment index against files it did not write: foreign output folders, shards copied from another index or
pointed at outside it, truncated or deleted shards (repaired by rerunning `index`), undecodable queries and
negative --rerank."""

import json
import os

import numpy as np
import pytest

from egovlp_deploy.cli import main
from egovlp_deploy.runtime import IndexFileError, IndexSettings, MomentIndex, QueryError, Runtime, build_index


def _settings(**kw):
    return IndexSettings(
        **{"frames": 4, "window_sec": 1.0, "stride_sec": 0.5, "prefixes": True, "commit_every": 2, **kw}
    )


@pytest.fixture(scope="module")
def rt(engines):
    return Runtime(engines)


def _build(idx, video_root, rt, uid="vid_a"):
    """vid_a: 5 windows in shards of 2, 2, 1 (shards/00000-0000{0,1,2}.safetensors)."""
    return build_index(idx, [str(video_root / uid / "0.mp4")], rt, _settings(), progress=False)


def _rewrite_index_json(idx, change):
    data = json.loads((idx / "index.json").read_text())
    change(data)
    (idx / "index.json").write_text(json.dumps(data))


def _one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"egovlp-deploy {command}: error: "), err
    return lines[0]


def test_index_never_deletes_what_it_did_not_write(rt, video_root, tmp_path):
    foreign = tmp_path / "photos"
    (foreign / "shards").mkdir(parents=True)
    (foreign / "shards" / "holiday.jpg").write_bytes(b"not ours")
    (foreign / "shards" / "00000-00000.safetensors").write_bytes(b"not ours either")
    with pytest.raises(IndexFileError, match=r"photos: not empty and not an egovlp-deploy index \(no index.json\)"):
        _build(foreign, video_root, rt)
    assert sorted(p.name for p in (foreign / "shards").iterdir()) == ["00000-00000.safetensors", "holiday.jpg"]
    assert not (foreign / "index.json").exists()

    (tmp_path / "empty").mkdir()  # an empty folder is taken
    assert _build(tmp_path / "empty", video_root, rt)["windows"] == 5

    # in our own index only our own leftovers go: unlisted shard names and the temp names of atomic writes
    idx = tmp_path / "idx"
    _build(idx, video_root, rt)
    shards = idx / "shards"
    kept = [
        shards / "notes.txt",
        shards / "00000-00000.safetensors.bak",
        shards / "00000-00000.safetensors.tmp",
        idx / "README.md",
    ]
    gone = [
        shards / "00007-00000.safetensors",
        shards / ".00007-00000.safetensors.ab_c1234.tmp",
        idx / ".index.json.x1y2z3_4.tmp",
    ]
    for p in kept + gone:
        p.write_bytes(b"x")
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"someone else's file")
    # an index.json that lists a file outside (and a stale fingerprint, so the video is dropped and re-indexed)
    _rewrite_index_json(
        idx,
        lambda d: d["videos"][0].update(
            fingerprint={"size": -1, "mtime_ns": 0}, shards=[{"file": str(victim), "start": 0, "count": 5}]
        ),
    )
    assert _build(idx, video_root, rt)["new_windows"] == 5
    assert all(p.exists() for p in kept) and not any(p.exists() for p in gone)
    assert victim.read_bytes() == b"someone else's file"


def test_search_refuses_foreign_and_outside_shards(rt, video_root, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    idx = tmp_path / "idx"
    _build(idx, video_root, rt)
    MomentIndex(idx)
    shard = idx / "shards" / "00000-00001.safetensors"
    original = shard.read_bytes()
    save_file(load_file(str(shard)), str(shard), metadata={"model_id": "0123456789abcdef"})  # another index's shard
    with pytest.raises(
        IndexFileError,
        match=r"00000-00001.safetensors: a shard of .*vid_a.* written by another model "
        r"\(0123456789abcdef; the index is model ",
    ):
        MomentIndex(idx)
    assert main(["search", str(idx), "a cup"]) == 2
    assert "another model" in _one_error_line(capsys.readouterr().err, "search")
    shard.write_bytes(original)

    outside = tmp_path / "elsewhere" / "x.safetensors"
    outside.parent.mkdir()
    outside.write_bytes(original)
    for listed in (str(outside), "../elsewhere/x.safetensors", "shards/../../elsewhere/x.safetensors"):
        _rewrite_index_json(idx, lambda d: d["videos"][0]["shards"][1].update(file=listed))
        with pytest.raises(IndexFileError, match="leaves the index folder"):
            MomentIndex(idx)
    _rewrite_index_json(idx, lambda d: d["videos"][0]["shards"][1].update(file="shards/00000-00001.safetensors"))
    shard.unlink()
    shard.symlink_to(outside)  # a link that leads out of the folder
    with pytest.raises(IndexFileError, match="outside the index folder"):
        MomentIndex(idx)


def test_truncated_shard_is_a_named_error(rt, video_root, tmp_path, capsys):
    idx = tmp_path / "idx"
    _build(idx, video_root, rt)
    shard = idx / "shards" / "00000-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(
        IndexFileError,
        match=r"00000-00002.safetensors: unreadable shard of .*vid_a.*rerun the same "
        r"`egovlp-deploy index` command",
    ):
        MomentIndex(idx)
    assert main(["search", str(idx), "a cup"]) == 2
    assert "00000-00002.safetensors: unreadable shard" in _one_error_line(capsys.readouterr().err, "search")


def test_rerunning_index_repairs_missing_and_unreadable_shards(rt, video_root, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    idx = tmp_path / "idx"
    _build(idx, video_root, rt)
    whole = MomentIndex(idx)
    shards = idx / "shards"
    (shards / "00000-00001.safetensors").unlink()
    assert main(["search", str(idx), "a cup"]) == 2
    line = _one_error_line(capsys.readouterr().err, "search")
    assert "00000-00001.safetensors: missing shard of " in line and "rerun the same `egovlp-deploy index`" in line
    s = _build(idx, video_root, rt)
    assert s["new_windows"] == 3  # from the missing shard's first window on
    assert "encoding windows 2-4 again" in s["notes"][0]["note"]
    for broken in ("truncated", "another model's"):
        shard = shards / "00000-00002.safetensors"
        if broken == "truncated":
            shard.write_bytes(shard.read_bytes()[:100])
        else:
            save_file(load_file(str(shard)), str(shard), metadata={"model_id": "0123456789abcdef"})
        assert _build(idx, video_root, rt)["new_windows"] == 1
    repaired = MomentIndex(idx)
    np.testing.assert_allclose(repaired.embeddings, whole.embeddings, atol=1e-6)
    np.testing.assert_array_equal(repaired.timestamps, whole.timestamps)
    np.testing.assert_allclose(repaired.prefixes(list(range(5))), whole.prefixes(list(range(5))), atol=1e-6)
    assert sorted(p.name for p in shards.iterdir()) == [f"00000-0000{i}.safetensors" for i in range(3)]
    assert _build(idx, video_root, rt)["new_windows"] == 0  # sound shards are left as they are


def test_undecodable_query_is_a_query_error(rt, engines, video_root, tmp_path, capsys):
    query = os.fsdecode(b"caf\xe9 cup")  # as sys.argv holds bytes that are not UTF-8: a lone surrogate
    with pytest.raises(QueryError, match=r"query 'caf\\xe9 cup' is not valid UTF-8 text"):
        rt.text_encoder.encode([query])
    idx = tmp_path / "idx"
    _build(idx, video_root, rt, "vid_c")
    assert main(["search", str(idx), query]) == 2
    assert "not valid UTF-8" in _one_error_line(capsys.readouterr().err, "search")
    assert (
        main(
            [
                "features",
                str(video_root / "vid_c" / "0.mp4"),
                "--engines",
                str(engines),
                "--out",
                str(tmp_path / "feats"),
                "--mode",
                "fusion",
                "--query",
                query,
                "--quiet",
            ]
        )
        == 2
    )
    assert "not valid UTF-8" in _one_error_line(capsys.readouterr().err, "features")


def test_negative_rerank_is_refused(rt, video_root, tmp_path, capsys):
    idx = tmp_path / "idx"
    _build(idx, video_root, rt, "vid_c")
    with pytest.raises(SystemExit) as exc:
        main(["search", str(idx), "a cup", "--rerank", "-5"])
    assert exc.value.code == 2 and "--rerank: must be 0 or more, got -5" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--rerank must be 0"):
        MomentIndex(idx).search(rt, "a cup", rerank=-1)
    assert main(["search", str(idx), "a cup", "--rerank", "0"]) == 0
