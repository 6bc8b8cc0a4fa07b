"""EpicMIRDataset on tiny EK-100 retrieval files: frame ranges, relevancy-sampled captions, bad data."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from egovlp_deploy.data import DataError, EpicMIRDataset, load_relevancy
from video_files import FPS, SIDE, STEP, write_video  # noqa: F401

HEADER = (
    "narration_id,participant_id,video_id,narration_timestamp,start_timestamp,stop_timestamp,start_frame,"
    "stop_frame,narration,verb,verb_class,noun,noun_class,all_nouns,all_noun_classes"
)


def line(nid="P01_01_0", start="00:00:00.50", stop="00:00:02.50", text="open drawer", pid="P01", vid="P01_01"):
    return f"{nid},{pid},{vid},00:00:01.00,{start},{stop},5,25,{text},open,3,drawer,8,\"['drawer']\",[8]"


def write_files(tmp: Path, lines: list[str], sentences=("open drawer", "close tap"), relevancy=None):
    csv = tmp / "EPIC_100_retrieval_test.csv"
    csv.write_text("\n".join([HEADER, *lines]) + "\n")
    sent = tmp / "EPIC_100_retrieval_test_sentence.csv"
    sent.write_text("narration_id,narration\n" + "".join(f"P01_01_{i},{s}\n" for i, s in enumerate(sentences)))
    rel = tmp / "relevancy.npy"
    np.save(rel, np.eye(len(lines), len(sentences)) if relevancy is None else relevancy)
    return csv, sent, rel


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("epic_videos")
    write_video(root / "P01" / "P01_01.MP4", 30)
    return root


class Spy:
    def __init__(self):
        from egovlp_deploy.data.epic import read_epic_clip

        self.reader, self.calls, self.frames = read_epic_clip, [], []

    def __call__(self, *args, rng=None, **kwargs):
        self.calls.append(args)
        self.frames.append(self.reader(*args, rng=rng, **kwargs))
        return self.frames[-1]


def ids(frames):
    return [round((float(f[..., 0].float().mean()) - 4) / STEP) for f in frames]


def fake_reader(path, start_sec, stop_sec, num_frames, jitter, rng=None):
    return torch.full((num_frames, 16, 16, 3), 50, dtype=torch.uint8)


def test_test_item_frame_range_and_layout(tmp_path, videos):
    csv, sent, rel = write_files(tmp_path, [line(), line(nid="P01_01_1", text="close tap")])
    spy = Spy()
    ds = EpicMIRDataset(csv, videos, num_frames=4, size=32, sentence_csv=sent, relevancy_path=rel, clip_reader=spy)
    item = ds[0]
    assert item["video"].shape == (4, 3, 32, 32) and item["video"].dtype == torch.float32
    assert (item["text"], item["relation"], item["index"], item["text_index"]) == ("open drawer", 1.0, 0, -1)
    # 0.5 s .. 2.5 s at 10 fps: start round(5.0) = 5, end ceil(25.0) = 25; segment size (25 - 5 - 1) / 4 = 4.75;
    # segments [5,10] [10,15] [15,19] [19,24] (np.round(9.5) = 10, half to even) -> middles 7 12 17 21
    assert ids(spy.frames[0]) == [7, 12, 17, 21]
    assert spy.calls[0][1:3] == (0.5, 2.5)
    from egovlp_deploy.transforms import eval_transform

    # the C++ path (preprocess.eval_clip) when built: the reference to float32 rounding (tests/test_preprocess.py)
    torch.testing.assert_close(item["video"], eval_transform(spy.frames[0], 32, variant="epic"), rtol=0, atol=1e-5)
    assert ds.MAX_TEXT_LENGTH == 30
    assert ds.sentence_ids == ["P01_01_0", "P01_01_1"] and ds.sentence_row_indices().tolist() == [0, 1]


def test_train_captions_follow_the_relevancy_matrix(tmp_path, videos):
    relevancy = np.array([[1.0, 0.0, 0.5, 0.1], [0.0, 0.05, 0.0, 0.1]])  # row 1 has no positive (> 0.1)
    csv, sent, rel = write_files(
        tmp_path,
        [line(), line(nid="P01_01_1", text="close tap")],
        sentences=("s0", "s1", "s2", "s3"),
        relevancy=relevancy,
    )
    spy = Spy()
    ds = EpicMIRDataset(
        csv,
        videos,
        num_frames=4,
        size=32,
        split="train",
        sentence_csv=sent,
        relevancy_path=rel,
        clip_reader=spy,
        seed=5,
    )
    drawn = set()
    for epoch in range(10):
        ds.set_epoch(epoch)
        item = ds[0]
        assert item["text_index"] in (0, 2) and item["text"] == f"s{item['text_index']}"
        assert item["relation"] == relevancy[0, item["text_index"]]
        drawn.add(item["text_index"])
        for i, (lo, hi) in zip(ids(spy.frames[-1]), ((5, 10), (10, 15), (15, 19), (19, 24))):
            assert lo <= i <= hi  # jitter: inside the closed segment
    assert drawn == {0, 2}
    item = ds[1]
    assert (item["text"], item["relation"], item["text_index"]) == ("close tap", 1.0, 0)  # official fallback
    ds.set_epoch(3)
    a, b = ds[0], ds[0]
    assert a["text"] == b["text"] and torch.equal(a["video"], b["video"])
    with pytest.raises(ValueError, match="relevancy"):
        EpicMIRDataset(csv, videos, num_frames=4, size=32, split="train")


BAD_LINES = {
    "missing field": "P01_01_9,P01,P01_01,00:00:01.00,00:00:00.50",
    "bad timestamp": line(start="0:0.5"),
    "non-numeric timestamp": line(stop="00:00:xx"),
    "stop before start": line(start="00:00:02.00", stop="00:00:01.00"),
    "empty narration": line(text=" "),
    "missing video": line(vid="P01_99"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_rows_strict_raise_lax_skip(tmp_path, videos, case):
    csv, sent, rel = write_files(
        tmp_path,
        [line(), BAD_LINES[case], line(nid="P01_01_1", text="close tap")],
        relevancy=np.array([[1, 0], [0, 0], [0, 1]]),  # each good row is relevant (1) to its own narration
    )
    with pytest.raises(DataError) as err:
        EpicMIRDataset(csv, videos, num_frames=2, size=16, sentence_csv=sent, relevancy_path=rel)
    assert str(csv) in str(err.value) and "line 3" in str(err.value)
    ds = EpicMIRDataset(
        csv, videos, num_frames=2, size=16, sentence_csv=sent, relevancy_path=rel, strict=False, clip_reader=fake_reader
    )
    assert len(ds) == 2 and [r for r, _ in ds.skipped_rows] == [3]
    # the relevancy row of each item is its original CSV data row, not its position after skipping
    assert ds.row_indices.tolist() == [0, 2] and ds[1]["index"] == 2 and ds[1]["text"] == "close tap"
    assert ds.sentence_row_indices().tolist() == [0, 2]


def test_clip_outside_the_video(tmp_path, videos):
    from egovlp_deploy.transforms import black_clip

    csv, _, _ = write_files(tmp_path, [line(start="00:00:02.00", stop="00:00:04.00")])  # the video is 3 s
    with pytest.raises(DataError, match="line 2"):
        EpicMIRDataset(csv, videos, num_frames=4, size=16)[0]
    lax = EpicMIRDataset(csv, videos, num_frames=4, size=16, strict=False)
    item = lax[0]
    assert item["load_failed"] == 1 and lax.failures["out_of_range"] == 1
    assert torch.equal(item["video"], black_clip(4, 16))


def test_relevancy_files_are_never_unpickled(tmp_path, videos):
    pkl = tmp_path / "caption_relevancy.pkl"
    pkl.write_bytes(pickle.dumps(np.eye(2)))
    with pytest.raises(DataError, match="without pickle"):
        load_relevancy(pkl)
    obj = tmp_path / "object.npy"
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError):
        load_relevancy(obj)
    npz = tmp_path / "rel.npz"
    np.savez(npz, relevancy=np.eye(2, 3), other=np.zeros(1))
    assert load_relevancy(npz).shape == (2, 3)
    csv, sent, _ = write_files(tmp_path, [line()])
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.eye(3, 2))
    with pytest.raises(DataError, match="shape"):
        EpicMIRDataset(csv, videos, num_frames=2, size=16, sentence_csv=sent, relevancy_path=wrong)


def test_bad_sentence_file_is_fatal_even_in_lax_mode(tmp_path, videos):
    csv, sent, rel = write_files(tmp_path, [line(), line(nid="P01_01_1")])
    sent.write_text("narration_id,narration\nP01_01_0,open drawer\nP01_01_1,\n")
    with pytest.raises(DataError, match="line 3"):
        EpicMIRDataset(csv, videos, num_frames=2, size=16, sentence_csv=sent, strict=False)
