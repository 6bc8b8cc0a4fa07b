"""`egovlp-deploy synth` writes EK-100 MIR and Charades-Ego files that our official-format readers take in strict
mode, with a consistent relevancy matrix and test splits from held-out videos only."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")

from egovlp_deploy import vocabulary as vocab
from egovlp_deploy.data import CharadesEgoDataset, EpicMIRDataset, load_charades_classes, synth, synth_downstream
from egovlp_deploy.metrics import charades_map, mir_metrics

TINY = dict(train_videos=2, eval_videos=3, clips_per_video=6, fps=15, clip_seconds=1.6, size=32)
EPIC_HEADER = [
    "narration_id",
    "participant_id",
    "video_id",
    "narration_timestamp",
    "start_timestamp",
    "stop_timestamp",
    "start_frame",
    "stop_frame",
    "narration",
    "verb",
    "verb_class",
    "noun",
    "noun_class",
    "all_nouns",
    "all_noun_classes",
]
CHARADES_HEADER = [
    "id",
    "subject",
    "scene",
    "quality",
    "relevance",
    "verified",
    "script",
    "objects",
    "descriptions",
    "actions",
    "length",
]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    synth.generate(out, seed=5, workers=1, **TINY)
    return out


def _rows(path: Path, delimiter: str = ",") -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        return reader.fieldnames, list(reader)


def _epic(out: Path, split: str, num_frames: int = 4) -> EpicMIRDataset:
    root = out / "epic"
    return EpicMIRDataset(
        root / f"EPIC_100_retrieval_{split}.csv",
        root / "videos",
        num_frames,
        32,
        split=split,
        sentence_csv=root / f"EPIC_100_retrieval_{split}_sentence.csv",
        relevancy_path=root / "relevancy" / f"caption_relevancy_EPIC_100_retrieval_{split}.npy",
        strict=True,
    )


def test_epic_files_are_read_in_strict_mode(out):
    meta = json.loads((out / "meta.json").read_text())
    for split, uids, clips in (
        ("test", meta["splits"]["eval"], TINY["eval_videos"]),
        ("train", meta["splits"]["train"], TINY["train_videos"]),
    ):
        header, rows = _rows(out / "epic" / f"EPIC_100_retrieval_{split}.csv")
        assert header == EPIC_HEADER
        assert {r["video_id"] for r in rows} == set(uids)  # test = the held-out videos, train = the training ones
        for r in rows:
            assert meta["verbs"][int(r["verb_class"])] == r["verb"] and meta["nouns"][int(r["noun_class"])] == r["noun"]
            assert r["narration"] == f"{vocab.VERBS[r['verb']]} the {r['noun']}"
        dataset = _epic(out, split, num_frames=16)  # the official EK-100 frame count
        assert len(dataset) == clips * TINY["clips_per_video"] and not dataset.skipped_rows
        item = dataset[len(dataset) - 1]
        assert item["video"].shape == (16, 3, 32, 32) and item["load_failed"] == 0
        if split == "test":
            assert item["text"] == rows[-1]["narration"] and item["relation"] == 1.0
        else:  # a caption drawn among the row's positives
            assert dataset.relevancy[item["index"], item["text_index"]] > 0.1
    assert not set(meta["splits"]["train"]) & set(meta["splits"]["eval"])


def test_relevancy_matrix_shape_diagonal_and_positives(out):
    for split in ("test", "train"):
        dataset = _epic(out, split)
        rel, narrations = dataset.relevancy, [r["narration"] for r in dataset._rows]
        assert rel.shape == (len(dataset), len(dataset.sentences)) and rel.dtype == np.float32
        assert len(set(dataset.sentences)) == len(dataset.sentences) == len(set(narrations))
        assert set(np.unique(rel)) <= {0.0, 0.5, 1.0}
        # relevancy 1 exactly for the clips narrated by the sentence: the "diagonal" of clip -> own sentence
        own = np.array([[n == s for s in dataset.sentences] for n in narrations])
        assert np.array_equal(rel == 1, own)
        # each sentence stands for the first clip with its narration
        rows = dataset.sentence_row_indices()
        assert [narrations[r] for r in rows] == dataset.sentences
        assert np.all(rel[rows, np.arange(len(rows))] == 1)
        # 0.5: a shared verb or a shared (coloured) noun, not both
        _, csv_rows = _rows(out / "epic" / f"EPIC_100_retrieval_{split}.csv")
        verb = np.array([r["verb_class"] for r in csv_rows])
        noun = np.array([r["noun_class"] for r in csv_rows])
        expected = 0.5 * (verb[:, None] == verb[rows][None]) + 0.5 * (noun[:, None] == noun[rows][None])
        assert np.array_equal(rel, expected.astype(np.float32))
        assert (rel == 0.5).any()
    # the official metric accepts the files: every clip and every sentence has a relevancy-1 partner
    test = _epic(out, "test")
    sim = np.random.default_rng(0).standard_normal((len(test), len(test))).astype(np.float32)
    scores = mir_metrics(sim, np.arange(len(test)), test.relevancy, test.narration_ids, test.sentence_ids)
    assert set(scores) == {"nDCG_V2T", "nDCG_T2V", "nDCG_AVG", "mAP_V2T", "mAP_T2V", "mAP_AVG"}


def test_charades_files_are_read_in_strict_mode(out):
    root, meta = out / "charades", json.loads((out / "meta.json").read_text())
    classes = synth_downstream.charades_classes()
    prompts = load_charades_classes(root / "Charades_v1_classes.txt", len(classes))
    assert prompts == [synth_downstream.charades_class_name(v, n) for v, n in classes]
    header, rows = _rows(root / "CharadesEgo_v1_test_only1st.csv")
    assert header == CHARADES_HEADER and [r["id"] for r in rows] == meta["splits"]["eval"]
    _, train_rows = _rows(root / "CharadesEgo_v1_train_only1st.csv")
    assert [r["id"] for r in train_rows] == meta["splits"]["train"]

    test = CharadesEgoDataset(
        root / "CharadesEgo_v1_test_only1st.csv",
        root / "videos",
        8,
        32,
        split="test",
        classes_path=root / "Charades_v1_classes.txt",
        num_classes=len(classes),
        strict=True,
    )
    assert len(test) == TINY["eval_videos"] and test.prompts == prompts
    _, held = _rows(out / "egoclip_eval.csv", "\t")
    item = test[0]
    first_video = [r for r in held if r["video_uid"] == rows[0]["id"]]
    expected = {
        classes.index((meta["verbs"][int(r["tag_verb"][1:-1])], r["clip_text"].rsplit(" ", 1)[1])) for r in first_video
    }
    assert set(np.flatnonzero(item["target"].numpy())) == expected
    assert item["video"].shape == (8, 3, 32, 32) and item["load_failed"] == 0

    train = CharadesEgoDataset(
        root / "metadata_train.csv", root / "videos", 4, 32, split="train", num_classes=len(classes), strict=True
    )
    assert len(train) == TINY["train_videos"] * TINY["clips_per_video"]  # one row per action
    item = train[0]
    assert item["text"] in prompts and item["target"].sum() == 1 and item["load_failed"] == 0
    targets = np.stack([test[i]["target"].numpy() for i in range(len(test))])
    assert 0 < charades_map(np.random.default_rng(0).random(targets.shape), targets) <= 1


def test_clip_times_stay_inside_their_clip(out):
    """Rounded to 1/100 s inward, so neither format reaches a neighbouring action."""
    _, egoclip = _rows(out / "egoclip_eval.csv", "\t")
    _, epic = _rows(out / "epic" / "EPIC_100_retrieval_test.csv")
    for clip, row in zip(egoclip, epic):
        assert row["narration_id"] == f"{clip['video_uid']}_{clip['narration_ind']}"
        start = synth_downstream._seconds(row["start_timestamp"])
        stop = synth_downstream._seconds(row["stop_timestamp"])
        assert float(clip["clip_start"]) <= start < stop <= float(clip["clip_end"])
        assert abs(start - float(clip["clip_start"])) < 0.01 and abs(stop - float(clip["clip_end"])) < 0.01
    assert synth_downstream.epic_timestamp(3725.5, up=True) == "01:02:05.50"
    assert synth_downstream.charades_time(1.4667, up=False) == "1.46"
    assert synth_downstream.charades_time(1.4601, up=True) == "1.47"
