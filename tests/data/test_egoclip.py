"""EgoClipDataset on tiny official-format files: item layout, tags, frame sampling, scene-aware negatives, and
every bad-data case in strict and lax mode."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from egovlp_deploy.data import DataError, EgoClipDataset
from egovlp_deploy.data.egoclip import EGOCLIP_COLUMNS
from video_files import FPS, SIDE, STEP, write_video  # noqa: F401


def frame_ids(frames: torch.Tensor) -> list[int]:
    """uint8 (F,H,W,3) of write_video frames -> their indices (x264 moves a flat colour by a few levels)."""
    return [round((float(f[..., 0].float().mean()) - 4) / STEP) for f in frames]


def row(
    uid="vid_a",
    dur=3.0,
    ntime=1.0,
    start=0.5,
    end=2.5,
    text="#C C opens the drawer",
    verbs="[3, 17]",
    nouns="[0]",
    **over,
) -> dict:
    fields = dict(
        video_uid=uid,
        video_dur=dur,
        narration_source="narration_pass_1",
        narration_ind=0,
        narration_time=ntime,
        clip_start=start,
        clip_end=end,
        clip_text=text,
        tag_verb=verbs,
        tag_noun=nouns,
    )
    fields.update(over)
    return fields


def write_csv(path: Path, rows: list[dict | str]) -> Path:
    lines = ["\t".join(EGOCLIP_COLUMNS)]
    lines += [r if isinstance(r, str) else "\t".join(str(r[c]) for c in EGOCLIP_COLUMNS) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("egoclip_videos")
    write_video(root / "vid_a" / "0.mp4", 30)
    write_video(root / "vid_b" / "0.mp4", 30)
    return root


class Spy:
    """Wraps a clip reader and keeps what it returned (the raw uint8 frames) and how it was called."""

    def __init__(self, reader=None):
        from egovlp_deploy.decoding import read_egoclip_clip

        self.reader, self.calls, self.frames = reader or read_egoclip_clip, [], []

    def __call__(self, *args, rng=None, **kwargs):
        self.calls.append(args)
        frames = self.reader(*args, rng=rng, **kwargs)
        self.frames.append(frames)
        return frames


def fake_reader(video_root, video_uid, start_sec, end_sec, num_frames, sample, rng=None):
    """Module level, so DataLoader workers can unpickle it. Frame values carry the rng's draw."""
    value = rng.randrange(256) if rng is not None else 0
    return torch.full((num_frames, 16, 16, 3), value, dtype=torch.uint8)


def test_item_layout_tags_and_uniform_sampling(tmp_path, videos):
    csv = write_csv(tmp_path / "egoclip.csv", [row(verbs="[3, 17]", nouns="[0, 581]")])
    spy = Spy()
    ds = EgoClipDataset(csv, videos, num_frames=4, size=32, split="val", neg_window=None, clip_reader=spy)
    item = ds[0]
    assert item["video"].shape == (4, 3, 32, 32) and item["video"].dtype == torch.float32
    assert item["text"] == "#C C opens the drawer" and "video_neg" not in item and item["load_failed"] == 0
    assert item["verb"].shape == (118,) and item["noun"].shape == (582,) and item["verb"].dtype == torch.float32
    assert item["verb"].nonzero().flatten().tolist() == [3, 17]
    assert item["noun"].nonzero().flatten().tolist() == [0, 581]
    # [0.5, 2.5] s at 10 fps = frames [5, 25): boundaries 5,10,15,20,25 -> segment middles (b + b' - 1) // 2
    assert frame_ids(spy.frames[0]) == [7, 12, 17, 22]


def test_train_rand_sampling_stays_in_segments_and_is_reproducible(tmp_path, videos):
    csv = write_csv(tmp_path / "egoclip.csv", [row()])
    spy = Spy()
    ds = EgoClipDataset(csv, videos, num_frames=4, size=32, split="train", neg_window=None, clip_reader=spy, seed=3)
    first = ds[0]["video"]
    for ids in map(frame_ids, spy.frames):
        assert all(b <= i <= b + 3 for i, b in zip(ids, (5, 10, 15, 20)))  # 'rand': [b_i, b_{i+1} - 2]
    assert torch.equal(ds[0]["video"], first)  # same (seed, epoch, index): same frames, crop and flip
    draws = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        ds[0]
        draws.add(tuple(frame_ids(spy.frames[-1])))
    assert len(draws) > 1  # epochs draw different frames


def bucket_rows() -> list[dict]:
    # vid_a: narration times 10, 20, 59.9 share bucket 0; 60 and 119 share bucket 1; vid_b 30 is alone.
    times = [("vid_a", 10.0), ("vid_a", 20.0), ("vid_a", 59.9), ("vid_a", 60.0), ("vid_a", 119.0), ("vid_b", 30.0)]
    return [row(uid=u, dur=200.0, ntime=t, start=t - 1, end=t + 1, text=f"{u} at {t}") for u, t in times]


def test_negative_comes_from_the_same_60s_bucket_and_is_deterministic(tmp_path, videos):
    rows = bucket_rows()
    csv = write_csv(tmp_path / "egoclip.csv", rows)

    def make(seed):
        return EgoClipDataset(csv, videos, num_frames=2, size=16, seed=seed, clip_reader=fake_reader, check_files=False)

    ds = make(0)
    bucket = {r["clip_text"]: (r["video_uid"], r["narration_time"] // 60) for r in rows}
    seen = {i: set() for i in range(len(rows))}
    for epoch in range(12):
        ds.set_epoch(epoch)
        for i, r in enumerate(rows):
            item = ds[i]
            assert bucket[item["text_neg"]] == bucket[r["clip_text"]]
            assert item["verb_neg"].shape == (118,) and item["video_neg"].shape == (2, 3, 16, 16)
            seen[i].add(item["text_neg"])
    assert seen[5] == {"vid_b at 30.0"}  # alone in its bucket: the negative is itself
    assert seen[0] == {r["clip_text"] for r in rows[:3]}  # every bucket member is drawn, itself included
    ds.set_epoch(4)
    again = make(0)
    again.set_epoch(4)
    for i in range(len(rows)):
        a, b = ds[i], again[i]
        assert a["text_neg"] == b["text_neg"] and torch.equal(a["video"], b["video"])
        assert torch.equal(a["video_neg"], b["video_neg"])
    other = make(1)
    other.set_epoch(4)
    assert any(not torch.equal(ds[i]["video"], other[i]["video"]) for i in range(len(rows)))


def test_set_epoch_reaches_persistent_dataloader_workers(tmp_path, videos):
    csv = write_csv(tmp_path / "egoclip.csv", bucket_rows())
    ds = EgoClipDataset(csv, videos, num_frames=2, size=16, clip_reader=fake_reader, check_files=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=6, num_workers=1, persistent_workers=True)
    for epoch in (0, 1, 2):
        ds.set_epoch(epoch)
        batch = next(iter(loader))
        expected = torch.stack([ds[i]["video"] for i in range(6)])
        assert torch.equal(batch["video"], expected), epoch


BAD_ROWS = {
    "missing field": "vid_a\t3.0\tnarration_pass_1\t0\t1.0\t0.5\t2.5\t#C C opens\t[3]",
    "non-numeric start": row(start="abc"),
    "nan end": row(end="nan"),
    "bad tag list": row(verbs="[3, 17"),
    "code in tag list": row(nouns="__import__('os').system('true')"),
    "non-int tag": row(verbs="[3.5]"),
    "verb id too large": row(verbs="[118]"),
    "negative noun id": row(nouns="[-1]"),
    "empty narration": row(text="  "),
    "clip after the video": row(start=3.5, end=4.0),
    "clip before the video": row(start=-2.0, end=-1.0),
    "end before start": row(start=2.0, end=1.0),
    "missing video": row(uid="vid_missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_strict_raise_lax_skip(tmp_path, videos, case):
    rows = [row(text="good one"), BAD_ROWS[case], row(text="good two")]
    csv = write_csv(tmp_path / "egoclip.csv", rows)
    with pytest.raises(DataError) as err:
        EgoClipDataset(csv, videos, num_frames=2, size=16)
    assert str(csv) in str(err.value) and "line 3" in str(err.value)  # header is line 1
    ds = EgoClipDataset(csv, videos, num_frames=2, size=16, strict=False, clip_reader=fake_reader)
    assert len(ds) == 2 and [r for r, _ in ds.skipped_rows] == [3] and sum(ds.skip_counts.values()) == 1
    assert {ds[0]["text"], ds[1]["text"]} == {"good one", "good two"}
    assert ds.line_of(1) == 4


def test_negative_clip_start_is_clamped_like_the_official(tmp_path, videos):
    csv = write_csv(tmp_path / "egoclip.csv", [row(start=-0.5, end=1.0)])
    spy = Spy(fake_reader)
    EgoClipDataset(csv, videos, num_frames=2, size=16, split="val", neg_window=None, clip_reader=spy)[0]
    assert spy.calls[0][2:4] == (0.0, 1.0)


def test_whole_file_problems_are_fatal_even_in_lax_mode(tmp_path, videos):
    comma = tmp_path / "comma.csv"
    comma.write_text(",".join(EGOCLIP_COLUMNS) + "\n")
    with pytest.raises(DataError, match="missing columns"):
        EgoClipDataset(comma, videos, num_frames=2, size=16, strict=False)
    all_bad = write_csv(tmp_path / "bad.csv", [row(text=""), row(verbs="x")])
    with pytest.raises(DataError, match="no usable row"):
        EgoClipDataset(all_bad, videos, num_frames=2, size=16, strict=False)


def test_unreadable_video_strict_raises_lax_gives_black_clip(tmp_path, videos):
    from egovlp_deploy.transforms import black_clip

    root = tmp_path / "videos"
    data = (videos / "vid_a" / "0.mp4").read_bytes()
    (root / "vid_t").mkdir(parents=True)
    (root / "vid_t" / "0.mp4").write_bytes(data[: len(data) // 3])  # truncated
    csv = write_csv(tmp_path / "egoclip.csv", [row(uid="vid_t")])
    strict = EgoClipDataset(csv, root, num_frames=4, size=32, split="val", neg_window=None)
    with pytest.raises(DataError) as err:
        strict[0]
    assert "line 2" in str(err.value) and "vid_t" in str(err.value)
    # DataLoader workers re-raise as exc_type(message) and pickle exceptions: both must keep the type and text
    assert str(DataError(str(err.value))) == str(err.value)
    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)
    lax = EgoClipDataset(csv, root, num_frames=4, size=32, split="val", neg_window=None, strict=False)
    item = lax[0]
    assert item["load_failed"] == 1 and sum(lax.failures.values()) == 1
    assert torch.equal(item["video"], black_clip(4, 32))


def test_constructor_rejects_bad_arguments(tmp_path, videos):
    csv = write_csv(tmp_path / "egoclip.csv", [row()])
    for kwargs in (dict(num_frames=0), dict(neg_window=0), dict(seed=-1)):
        with pytest.raises(ValueError):
            EgoClipDataset(csv, videos, **{"num_frames": 2, "size": 16, **kwargs})
    ds = EgoClipDataset(csv, videos, num_frames=2, size=16, clip_reader=fake_reader)
    with pytest.raises(IndexError):
        ds[1]


def test_video_files_are_the_chunks_the_rows_read(tmp_path, videos):
    """What a checkpoint's data fingerprint lists: each (video, chunk) a row's start or end falls in; a start before
    the video's beginning is read as 0 (the row parser clamps it), so there is no chunk number -1."""
    rows = [
        row("vid_b", start=0.5, end=2.0),
        row("vid_a", start=-0.5, end=1.0),
        row("vid_a", dur=700.0, ntime=600.0, start=599.0, end=601.0),
    ]
    ds = EgoClipDataset(write_csv(tmp_path / "egoclip.csv", rows), videos, 2, 16, check_files=False)
    assert ds.video_files() == ["vid_a/0.mp4", "vid_a/1.mp4", "vid_b/0.mp4"]
