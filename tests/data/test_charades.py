"""CharadesEgoDataset on tiny official-format files: multi-hot targets, class prompts, sampling, bad data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from egovlp_deploy.data import CharadesEgoDataset, DataError, load_charades_classes, parse_actions
from video_files import FPS, SIDE, STEP, write_video  # noqa: F401

HEADER = "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length"


def test_row(vid="AB12EGO", actions="c092 11.90 21.20;c147 0.00 12.60", script="A person opens a door."):
    return f'{vid},S1,Kitchen,6,7,Yes,"{script}",door,"Opens a door.","{actions}",30.5'


test_row.__test__ = False  # a helper, not a test


def write_test_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("charades_videos")
    write_video(root / "AB12EGO.mp4", 30)
    write_video(root / "CD34EGO.mp4", 30)
    return root


def ids(frames):
    return [round((float(f[..., 0].float().mean()) - 4) / STEP) for f in frames]


class Spy:
    def __init__(self):
        from egovlp_deploy.data.charades import read_charades_clip

        self.reader, self.calls, self.frames = read_charades_clip, [], []

    def __call__(self, *args, rng=None, **kwargs):
        self.calls.append(args)
        self.frames.append(self.reader(*args, rng=rng, **kwargs))
        return self.frames[-1]


def fake_reader(path, start_sec, end_sec, num_frames, sample, rng=None):
    return torch.full((num_frames, 16, 16, 3), 9, dtype=torch.uint8)


def test_parse_actions_by_hand():
    assert parse_actions("c092 11.90 21.20;c147 0.00 12.60") == [(92, 11.9, 21.2), (147, 0.0, 12.6)]
    assert parse_actions("") == []


def test_test_item_targets_and_whole_video_uniform_sampling(tmp_path, videos):
    csv = write_test_csv(
        tmp_path / "CharadesEgo_v1_test_only1st.csv", [test_row(), test_row(vid="CD34EGO", actions="")]
    )
    spy = Spy()
    ds = CharadesEgoDataset(csv, videos, num_frames=4, size=32, clip_reader=spy)
    item = ds[0]
    assert item["video"].shape == (4, 3, 32, 32) and item["video"].dtype == torch.float32
    assert item["target"].shape == (157,) and item["target"].nonzero().flatten().tolist() == [92, 147]
    assert item["text"] == "A person opens a door." and item["load_failed"] == 0
    # the whole 30-frame video: boundaries 0 7 15 22 30 -> middles (b + b' - 1) // 2
    assert spy.calls[0][1:3] == (None, None) and ids(spy.frames[0]) == [3, 10, 18, 25]
    assert ds[1]["target"].sum() == 0  # no action: all-zero target


def test_train_metadata_clip_and_one_hot_target(tmp_path, videos):
    meta = tmp_path / "metadata_train.csv"
    meta.write_text("id\tcls\tt_start\tt_end\tnarration\nAB12EGO\t92\t0.5\t2.5\tOpening a door\n")
    spy = Spy()
    ds = CharadesEgoDataset(meta, videos, num_frames=4, size=32, split="train", clip_reader=spy, seed=1)
    item = ds[0]
    assert item["text"] == "Opening a door" and item["target"].nonzero().flatten().tolist() == [92]
    # [0.5, 2.5] s at 10 fps = frames [5, 25): 'rand' picks in [b_i, b_{i+1} - 2]
    assert all(b <= i <= b + 3 for i, b in zip(ids(spy.frames[0]), (5, 10, 15, 20)))
    assert torch.equal(ds[0]["video"], item["video"])


def test_class_prompts_are_line_from_char_5_of_the_first_csv_field(tmp_path):
    path = tmp_path / "Charades_v1_classes.txt"
    names = [f"c{i:03d} Class number {i}" for i in range(157)]
    names[1] = "c001 Holding a cup, a glass"  # the official csv.reader keeps only the first field
    path.write_text("\n".join(names) + "\n\n")
    prompts = load_charades_classes(path)
    assert len(prompts) == 157 and prompts[0] == "Class number 0" and prompts[1] == "Holding a cup"
    path.write_text("\n".join(names[:156]) + "\n")
    with pytest.raises(DataError, match="156 classes"):
        load_charades_classes(path)
    names[5] = "c006 Out of order"
    path.write_text("\n".join(names) + "\n")
    with pytest.raises(DataError, match="line 6"):
        load_charades_classes(path)


BAD_ROWS = {
    "missing field": "AB12EGO,S1,Kitchen,6",
    "unknown class": test_row(actions="c157 0.00 1.00"),
    "bad class token": test_row(actions="x092 0.00 1.00"),
    "non-numeric time": test_row(actions="c092 zero 1.00"),
    "two-part action": test_row(actions="c092 1.00"),
    "missing video": test_row(vid="ZZ99EGO"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_strict_raise_lax_skip(tmp_path, videos, case):
    csv = write_test_csv(tmp_path / "test.csv", [test_row(), BAD_ROWS[case], test_row(vid="CD34EGO")])
    with pytest.raises(DataError) as err:
        CharadesEgoDataset(csv, videos, num_frames=2, size=16)
    assert str(csv) in str(err.value) and "line 3" in str(err.value)
    ds = CharadesEgoDataset(csv, videos, num_frames=2, size=16, strict=False, clip_reader=fake_reader)
    assert len(ds) == 2 and [r for r, _ in ds.skipped_rows] == [3] and sum(ds.skip_counts.values()) == 1


BAD_TRAIN = {
    "empty narration": "AB12EGO\t3\t0.5\t2.5\t ",
    "unknown class": "AB12EGO\t157\t0.5\t2.5\tx",
    "negative class": "AB12EGO\t-1\t0.5\t2.5\tx",
    "end before start": "AB12EGO\t3\t2.5\t0.5\tx",
    "non-numeric start": "AB12EGO\t3\tsoon\t0.5\tx",
}


@pytest.mark.parametrize("case", sorted(BAD_TRAIN))
def test_bad_train_rows(tmp_path, videos, case):
    meta = tmp_path / "metadata_train.csv"
    meta.write_text("id\tcls\tt_start\tt_end\tnarration\n" + BAD_TRAIN[case] + "\nAB12EGO\t3\t0.5\t2.5\tok\n")
    with pytest.raises(DataError, match="line 2"):
        CharadesEgoDataset(meta, videos, num_frames=2, size=16, split="train")
    ds = CharadesEgoDataset(meta, videos, num_frames=2, size=16, split="train", strict=False)
    assert len(ds) == 1 and ds.skipped_rows[0][0] == 2


def test_unreadable_video_strict_raises_lax_gives_black_clip(tmp_path, videos):
    from egovlp_deploy.transforms import black_clip

    root = tmp_path / "videos"
    root.mkdir()
    data = (videos / "AB12EGO.mp4").read_bytes()
    (root / "AB12EGO.mp4").write_bytes(data[: len(data) // 3])
    csv = write_test_csv(tmp_path / "test.csv", [test_row()])
    with pytest.raises(DataError, match="line 2"):
        CharadesEgoDataset(csv, root, num_frames=4, size=16)[0]
    lax = CharadesEgoDataset(csv, root, num_frames=4, size=16, strict=False)
    item = lax[0]
    assert item["load_failed"] == 1 and torch.equal(item["video"], black_clip(4, 16))
    assert item["target"].nonzero().flatten().tolist() == [92, 147]  # the label survives a lax video failure
