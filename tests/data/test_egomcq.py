"""EgoMCQDataset on a tiny official-format egomcq.json: item layout, choice order, and bad entries."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from egovlp_deploy.data import DataError, EgoMCQDataset
from video_files import FPS, SIDE, STEP, write_video  # noqa: F401


def clip(uid="vid_a", start=0.0, end=2.0, text="#C C opens the drawer", verbs="[1]", nouns="[2]") -> dict:
    return {
        "video_uid": uid,
        "video_dur": 3.0,
        "narration_source": "narration_pass_1",
        "narration_ind": 0,
        "narration_time": (start + end) / 2,
        "clip_start": start,
        "clip_end": end,
        "clip_text": text,
        "tag_verb": verbs,
        "tag_noun": nouns,
    }


def entry(answer=2, types=1) -> dict:
    # choice k covers [0.4 k, 0.4 k + 1.0] s, so its frames reveal which choice they came from
    return {
        "types": types,
        "query": clip(text="#C C picks up the cup"),
        "choices": {str(k): clip(start=0.4 * k, end=0.4 * k + 1.0, text=f"choice {k}") for k in range(5)},
        "answer": answer,
    }


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mcq_videos")
    write_video(root / "vid_a" / "0.mp4", 30)
    return root


def fake_reader(video_root, video_uid, start_sec, end_sec, num_frames, sample, rng=None):
    return torch.full((num_frames, 16, 16, 3), 100, dtype=torch.uint8)


def test_item_layout_and_choice_order(tmp_path, videos):
    from egovlp_deploy.decoding import read_egoclip_clip

    seen = []

    def spy(*args, rng=None, **kwargs):
        assert args[5] == "uniform" and rng is None
        seen.append(read_egoclip_clip(*args, rng=rng, **kwargs))
        return seen[-1]

    path = write_json(tmp_path / "egomcq.json", {"0": entry(answer=2, types=1), "1": entry(answer=4, types=2)})
    ds = EgoMCQDataset(path, videos, num_frames=2, size=32, clip_reader=spy)
    assert len(ds) == 2
    item = ds[1]
    assert item["videos"].shape == (5, 2, 3, 32, 32) and item["videos"].dtype == torch.float32
    assert item["text"] == "#C C picks up the cup" and item["answer"] == 4 and item["type"] == 2
    assert item["key"] == "1" and item["load_failed"] == 0
    # choice k: frames [4k, 4k + 10) -> two segments of 5, middles 4k + 2 and 4k + 7 (red = 8 i + 4)
    for k, frames in enumerate(seen):
        ids = [round((float(f[..., 0].float().mean()) - 4) / STEP) for f in frames]
        assert ids == [4 * k + 2, 4 * k + 7]
    # the dataset's tensors are the eval transform of exactly those frames, in choice order
    from egovlp_deploy.transforms import eval_transform

    for k, frames in enumerate(seen):
        # the C++ path (preprocess.eval_clip) when built: the reference to float32 rounding (test_preprocess.py)
        torch.testing.assert_close(item["videos"][k], eval_transform(frames, 32, variant="egoclip"), rtol=0, atol=1e-5)


def test_entries_are_ordered_by_integer_key(tmp_path, videos):
    data = {str(k): entry(answer=k % 5) for k in (10, 2, 1)}
    ds = EgoMCQDataset(write_json(tmp_path / "m.json", data), videos, num_frames=2, size=16, clip_reader=fake_reader)
    assert [e.key for e in ds.entries] == ["1", "2", "10"]


def _mutations() -> dict:
    def choices_4(e):
        del e["choices"]["4"]

    def choices_6(e):
        e["choices"]["5"] = clip()

    def answer_5(e):
        e["answer"] = 5

    def answer_neg(e):
        e["answer"] = -1

    def answer_str(e):
        e["answer"] = "2"

    def types_3(e):
        e["types"] = 3

    def no_choices(e):
        del e["choices"]

    def empty_query(e):
        e["query"]["clip_text"] = ""

    def query_bad_tags(e):
        e["query"]["tag_verb"] = "[1,"

    def choice_unknown_noun(e):
        e["choices"]["3"]["tag_noun"] = "[582]"

    def choice_bad_time(e):
        e["choices"]["1"]["clip_start"] = "soon"

    def choice_outside(e):
        e["choices"]["1"].update(clip_start=5.0, clip_end=6.0)

    def choice_missing_video(e):
        e["choices"]["0"]["video_uid"] = "vid_missing"

    def not_an_object(e):
        e.clear()

    return {
        f.__name__: f
        for f in (
            choices_4,
            choices_6,
            answer_5,
            answer_neg,
            answer_str,
            types_3,
            no_choices,
            empty_query,
            query_bad_tags,
            choice_unknown_noun,
            choice_bad_time,
            choice_outside,
            choice_missing_video,
            not_an_object,
        )
    }


MUTATIONS = _mutations()


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_bad_entries_strict_raise_lax_skip(tmp_path, videos, case):
    bad = copy.deepcopy(entry())
    MUTATIONS[case](bad)
    path = write_json(tmp_path / "egomcq.json", {"0": entry(), "1": bad, "2": entry(answer=0)})
    with pytest.raises(DataError) as err:
        EgoMCQDataset(path, videos, num_frames=2, size=16)
    assert str(path) in str(err.value) and "key '1'" in str(err.value)
    ds = EgoMCQDataset(path, videos, num_frames=2, size=16, strict=False, clip_reader=fake_reader)
    assert [e.key for e in ds.entries] == ["0", "2"] and [k for k, _ in ds.skipped_rows] == ["1"]
    assert ds[1]["answer"] == 0


def test_file_level_problems_are_fatal(tmp_path, videos):
    for name, text in (("list.json", "[]"), ("broken.json", '{"0": {')):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=name):
            EgoMCQDataset(tmp_path / name, videos, num_frames=2, size=16, strict=False)
    path = write_json(tmp_path / "keys.json", {"zero": entry(), "0": entry()})
    with pytest.raises(DataError, match="key 'zero'"):
        EgoMCQDataset(path, videos, num_frames=2, size=16)
    assert len(EgoMCQDataset(path, videos, num_frames=2, size=16, strict=False)) == 1


def test_unreadable_choice_video(tmp_path, videos):
    from egovlp_deploy.transforms import black_clip

    root = tmp_path / "videos"
    (root / "vid_a").mkdir(parents=True)
    (root / "vid_a" / "0.mp4").write_bytes(b"not a video at all")
    path = write_json(tmp_path / "egomcq.json", {"0": entry()})
    with pytest.raises(DataError, match="key '0'"):
        EgoMCQDataset(path, root, num_frames=2, size=16)[0]
    lax = EgoMCQDataset(path, root, num_frames=2, size=16, strict=False)
    item = lax[0]
    assert item["load_failed"] == 5 and sum(lax.failures.values()) == 5
    assert all(torch.equal(v, black_clip(2, 16)) for v in item["videos"])
