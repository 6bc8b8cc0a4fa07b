"""The synthetic dataset: official EgoClip/EgoMCQ layout, determinism, held-out split, and motions you can measure.

The motion checks find the acted object by its colour in the decoded mp4 (an independent measurement, not the
renderer's own state) at the two frames the 'uniform' sampler takes from the first and last quarter of a clip.
"""

from __future__ import annotations

import ast
import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")

from egovlp_deploy import vocabulary as vocab  # noqa: E402
from egovlp_deploy.data import synth  # noqa: E402

OFFICIAL_COLUMNS = [
    "video_uid",
    "video_dur",
    "narration_source",
    "narration_ind",
    "narration_time",
    "clip_start",
    "clip_end",
    "clip_text",
    "tag_verb",
    "tag_noun",
]
TINY = dict(train_videos=2, eval_videos=5, clips_per_video=7, fps=15, clip_seconds=1.6)
SEED = 3


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        assert reader.fieldnames == OFFICIAL_COLUMNS, f"{path}: header {reader.fieldnames}"
        return list(reader)


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    summary = synth.generate(out, seed=SEED, workers=1, **TINY)
    meta = json.loads((out / "meta.json").read_text())
    train, held = _read_csv(out / "egoclip.csv"), _read_csv(out / "egoclip_eval.csv")
    mcq = json.loads((out / "egomcq.json").read_text())
    videos = {uid: _decode(out / "videos" / uid / "0.mp4") for uid in meta["splits"]["train"] + meta["splits"]["eval"]}
    return dict(out=out, summary=summary, meta=meta, train=train, held=held, mcq=mcq, videos=videos)


def _verb(meta, row) -> str:
    (v,) = ast.literal_eval(row["tag_verb"])
    return meta["verbs"][v]


def _object(row) -> str:
    return row["clip_text"].rsplit(" the ", 1)[1]


def test_layout_columns_and_types(dataset):
    out, meta, mcq = dataset["out"], dataset["meta"], dataset["mcq"]
    assert sorted(p.name for p in out.iterdir()) == [
        "charades",
        "egoclip.csv",
        "egoclip_eval.csv",
        "egomcq.json",
        "epic",
        "meta.json",
        "videos",
    ]
    for row in dataset["train"] + dataset["held"]:
        float(row["video_dur"]), float(row["narration_time"]), int(row["narration_ind"])
        assert row["narration_source"] == "narration_pass_1"
        for tags in (row["tag_verb"], row["tag_noun"]):  # Python-list strings, parsed without eval
            assert isinstance(ast.literal_eval(tags), list)
    counts = meta["counts"]
    assert counts["train_clips"] == len(dataset["train"]) == TINY["train_videos"] * TINY["clips_per_video"]
    assert counts["eval_clips"] == len(dataset["held"]) == TINY["eval_videos"] * TINY["clips_per_video"]
    assert meta["num_verbs"] == len(meta["verbs"]) and meta["num_nouns"] == len(meta["nouns"])
    assert meta["seed"] == SEED and meta["fps"] == TINY["fps"] and meta["size"] == 64 and meta["version"]
    assert list(mcq) == [str(i) for i in range(len(mcq))] and counts["mcq_questions"] == len(mcq)
    for q in mcq.values():
        assert q["types"] in (1, 2) and sorted(q["choices"]) == ["0", "1", "2", "3", "4"]
        assert q["choices"][str(q["answer"])] == q["query"]
        assert set(q["query"]) == set(OFFICIAL_COLUMNS)
    assert counts["mcq_inter"] > 0 and counts["mcq_intra"] > 0
    assert len({q["answer"] for q in mcq.values()}) == 5  # the answer position is drawn, not fixed


def test_every_clip_lies_inside_a_decodable_video(dataset):
    fps = dataset["meta"]["fps"]
    rows = dataset["train"] + dataset["held"] + [c for q in dataset["mcq"].values() for c in q["choices"].values()]
    for row in rows:
        frames = dataset["videos"][row["video_uid"]]
        start, end, dur = float(row["clip_start"]), float(row["clip_end"]), float(row["video_dur"])
        assert 0 <= start < float(row["narration_time"]) < end <= dur < 600, row
        assert len(frames) == round(dur * fps), row["video_uid"]
        assert int(end * fps) < len(frames)  # the official reader's last frame index exists
        assert frames.shape[1:] == (64, 64, 3)
    for a, b in zip(dataset["train"], dataset["train"][1:]):  # no frame (int(sec * fps)) in two clips
        if a["video_uid"] == b["video_uid"]:
            assert int(float(a["clip_end"]) * fps) < int(float(b["clip_start"]) * fps)
    try:  # the default backend of our readers agrees on the frame count
        from egovlp_deploy.decoding import import_decord

        decord = import_decord()
    except ImportError:
        pytest.skip("decord is not installed (no aarch64 wheel)")
    for uid, frames in dataset["videos"].items():
        vr = decord.VideoReader(str(dataset["out"] / "videos" / uid / "0.mp4"))
        assert len(vr) == len(frames) and round(vr.get_avg_fps()) == fps


def test_tags_index_meta_and_match_the_narration(dataset):
    meta = dataset["meta"]
    verbs = meta["verbs"]
    for row in dataset["train"] + dataset["held"]:
        (v,), (n,) = ast.literal_eval(row["tag_verb"]), ast.literal_eval(row["tag_noun"])
        assert 0 <= v < meta["num_verbs"] and 0 <= n < meta["num_nouns"]
        words = row["clip_text"].split(" the ")
        assert words[0] == "#C C " + vocab.VERBS[verbs[v]], row["clip_text"]  # third person, EgoClip style
        colour, noun = words[1].split(" ")
        assert colour in meta["colours"] and f"{colour} {noun}" == meta["nouns"][n], row["clip_text"]
    # the demo tokenizer is trained on the vocabulary's corpus: it must cover every narration
    texts = {r["clip_text"] for r in dataset["train"] + dataset["held"]}
    assert texts <= set(vocab.corpus())
    assert {_verb(meta, r) for r in dataset["train"] + dataset["held"]} == set(verbs)  # the fixture shows all verbs


def test_scene_negative_buckets_hold_several_clips(dataset):
    buckets = defaultdict(int)
    for row in dataset["train"]:  # the official segment_id: video_uid + narration_time // 60
        buckets[(row["video_uid"], float(row["narration_time"]) // 60)] += 1
    assert min(buckets.values()) >= 2


def test_held_out_videos_only_in_egomcq(dataset):
    meta = dataset["meta"]
    train_uids, eval_uids = set(meta["splits"]["train"]), set(meta["splits"]["eval"])
    assert not train_uids & eval_uids
    assert {r["video_uid"] for r in dataset["train"]} == train_uids
    mcq_uids = {c["video_uid"] for q in dataset["mcq"].values() for c in q["choices"].values()}
    assert mcq_uids <= eval_uids and not mcq_uids & {r["video_uid"] for r in dataset["train"]}


def test_intra_questions_need_the_direction_of_motion(dataset):
    meta = dataset["meta"]
    intra = [q for q in dataset["mcq"].values() if q["types"] == 2]
    for q in intra:
        query, choices = q["query"], list(q["choices"].values())
        assert {c["video_uid"] for c in choices} == {query["video_uid"]}
        assert len({c["clip_text"] for c in choices}) == 5  # exactly one right answer
        opposite = meta["opposite_verbs"][_verb(meta, query)]
        assert any(_object(c) == _object(query) and _verb(meta, c) == opposite for c in choices), query["clip_text"]


def test_inter_distractors_come_from_other_videos(dataset):
    inter = [q for q in dataset["mcq"].values() if q["types"] == 1]
    assert len(inter) == len(dataset["held"])  # one per held-out clip
    for q in inter:
        query = q["query"]
        others = [c for k, c in q["choices"].items() if int(k) != q["answer"]]
        assert all(c["video_uid"] != query["video_uid"] for c in others)
        assert len({c["video_uid"] for c in others}) == 4  # 5 held-out videos: one distractor from each other
        assert all(_object(c) != _object(query) for c in others)


def _frames_at_quarters(dataset, row) -> tuple[np.ndarray, np.ndarray]:
    """The frames the 'uniform' sampler takes from the first and last of 4 segments (official sampling)."""
    fps = dataset["meta"]["fps"]
    start, end = int(float(row["clip_start"]) * fps), int(float(row["clip_end"]) * fps)
    iv = np.linspace(start, end, 5).astype(int)
    first, last = (iv[0] + iv[1] - 1) // 2, (iv[3] + iv[4] - 1) // 2
    frames = dataset["videos"][row["video_uid"]]
    return frames[first], frames[last]


def _mask(frame: np.ndarray, rgb, tol: float = 60) -> np.ndarray:
    # 60: 4:2:0 chroma at 64 px blurs the colour of thin, far (pushed) objects
    return np.linalg.norm(frame.astype(np.float32) - np.asarray(rgb, np.float32), axis=-1) < tol


def _centroid_y_and_area(frame, rgb) -> tuple[float, int]:
    ys, _ = np.nonzero(_mask(frame, rgb))
    assert len(ys) >= 8, "the acted object is visible by its colour"
    return float(ys.mean()), len(ys)


def _bbox_area(frame, rgb) -> int:
    ys, xs = np.nonzero(_mask(frame, rgb))
    return int((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))


@pytest.mark.parametrize("verb", ["pick up", "put down", "push", "pull", "open", "close", "rotate"])
def test_motion_is_measurable_in_the_decoded_video(dataset, verb):
    meta = dataset["meta"]
    rows = [r for r in dataset["train"] + dataset["held"] if _verb(meta, r) == verb]
    assert rows, f"the fixture has no '{verb}' clip"
    for row in rows:
        rgb = synth.COLOUR_RGB[_object(row).split(" ")[0]]
        first, last = _frames_at_quarters(dataset, row)
        (y0, a0), (y1, a1) = _centroid_y_and_area(first, rgb), _centroid_y_and_area(last, rgb)
        text = row["clip_text"]
        if verb == "pick up":  # LIFT is 20 px; 3/4 of it lies between the two frames
            assert y1 < y0 - 10, text
            # Look for skin only in the object's column, with a tight tolerance: where a white object's edge
            # meets an orange one, the blend passes for skin.
            cx = float(np.nonzero(_mask(first, rgb))[1].mean())
            top0, top1 = (
                np.nonzero(_mask(f, synth.SKIN, tol=25)[:, round(cx) - 3 : round(cx) + 4])[0].min()
                for f in (first, last)
            )
            assert top1 < top0 - 10, "the hand (the top of the skin region; the arm reaches the bottom) rises too"
        elif verb == "put down":
            assert y1 > y0 + 10, text
        # Thresholds: measured over 13 seeds x ~100 clips each, push 0.32-0.63, pull 1.72-3.5 (pixel counts),
        # open 1.29-2.0, close 0.5-0.73 (bounding boxes); a static object gives ~1.
        elif verb == "push":  # away: smaller (scale 0.95 -> 0.65 between the two frames)
            assert a1 < 0.75 * a0, text
        elif verb == "pull":
            assert a1 > 1.4 * a0, text
        elif verb == "open":  # the lid rises off / the covers spread: the object's extent grows
            assert _bbox_area(last, rgb) > 1.2 * _bbox_area(first, rgb), text
        elif verb == "close":
            assert _bbox_area(last, rgb) < 0.83 * _bbox_area(first, rgb), text
        else:  # rotate: spins in place
            # loose: chroma blur varies with the angle; a pan's centroid (its handle) circles the pivot
            assert abs(y1 - y0) < 6 and 0.6 < a1 / a0 < 1.6, text
            assert (_mask(first, rgb) ^ _mask(last, rgb)).sum() > 0.2 * a0, text


def test_opposite_verbs_are_time_reversals(dataset):
    """pick up vs put down (and push/pull, open/close) of one object differ only in the direction of time."""
    meta, fps = dataset["meta"], dataset["meta"]["fps"]
    rows = dataset["train"] + dataset["held"]
    pairs = [
        (a, b)
        for a, b in zip(rows, rows[1:])
        if a["video_uid"] == b["video_uid"]
        and _object(a) == _object(b)
        and meta["opposite_verbs"].get(_verb(meta, a)) == _verb(meta, b)
    ]
    assert {_verb(meta, a) for a, _ in pairs} >= {"pick up", "push"}
    for a, b in pairs:
        frames = dataset["videos"][a["video_uid"]]
        a0, a1 = round(float(a["clip_start"]) * fps), round(float(a["clip_end"]) * fps)
        b0, b1 = round(float(b["clip_start"]) * fps), round(float(b["clip_end"]) * fps)
        assert a1 - a0 == b1 - b0
        forward = frames[a0 : a1 + 1].astype(np.float32)
        backward = frames[b0 : b1 + 1][::-1].astype(np.float32)
        assert np.abs(forward - backward).mean() < 2.0, (a["clip_text"], b["clip_text"])  # codec noise only
        assert np.abs(forward - frames[b0 : b1 + 1]).mean() > 2 * np.abs(forward - backward).mean()


def test_same_seed_same_bytes_other_seed_differs(dataset, tmp_path):
    again = tmp_path / "again"
    synth.generate(again, seed=SEED, workers=2, **TINY)  # the worker count must not matter
    for name in (
        "egoclip.csv",
        "egoclip_eval.csv",
        "egomcq.json",
        "meta.json",
        "epic/EPIC_100_retrieval_test.csv",
        "epic/relevancy/caption_relevancy_EPIC_100_retrieval_train.npy",
        "charades/CharadesEgo_v1_test_only1st.csv",
        "charades/metadata_train.csv",
    ):
        assert (again / name).read_bytes() == (dataset["out"] / name).read_bytes(), name
    for uid, frames in dataset["videos"].items():
        assert np.array_equal(_decode(again / "videos" / uid / "0.mp4"), frames), uid
    other = tmp_path / "other"
    synth.generate(other, seed=SEED + 1, workers=1, **{**TINY, "train_videos": 1})
    assert (other / "egoclip_eval.csv").read_bytes() != (dataset["out"] / "egoclip_eval.csv").read_bytes()


def test_cli_refuses_to_overwrite_and_writes_atomically(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ds"
    args = [
        str(out),
        "--seed",
        "1",
        "--train-videos",
        "1",
        "--eval-videos",
        "2",
        "--clips-per-video",
        "2",
        "--fps",
        "10",
        "--clip-seconds",
        "1",
        "--workers",
        "1",
    ]
    assert synth.main(args) == 0
    assert synth.main(args) == 2 and "not empty" in capsys.readouterr().err
    assert synth.main(args + ["--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temp dirs left beside it

    def broken(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(synth, "encode_video", broken)
    fresh = tmp_path / "fresh"
    assert synth.main([str(fresh)] + args[1:]) == 2 and "disk full" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # a failed run leaves nothing behind
    assert synth.main([str(out)] + args[1:] + ["--force"]) == 2
    assert json.loads((out / "meta.json").read_text())["seed"] == 1  # the old dataset survives a failed --force


def test_bad_sizes_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="eval_videos"):
        synth.generate(tmp_path / "x", eval_videos=1)
    with pytest.raises(ValueError, match="size"):
        synth.generate(tmp_path / "x", size=63)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        synth.generate(tmp_path / "file")


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        synth.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--seed",
        "--force",
        "--train-videos",
        "--eval-videos",
        "--clips-per-video",
        "--clip-seconds",
        "--fps",
        "--size",
        "--workers",
        "--json",
    ):
        assert flag in text
