"""Fine-tuning and its evaluation on test splits as real EK-100 files come: sentences shared by several clips (the
official sentence CSV holds each narration once) and, with the shipped lax recipes, rows whose video is missing."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

pytest.importorskip("av")

from egovlp_deploy.cli import main
from egovlp_deploy.data import synth
from egovlp_deploy.trainer.config import TrainConfig
from egovlp_deploy.trainer.train import train
from official_format import saved_random_tiny
from training_cli import two_ranks

TINY = dict(train_videos=2, eval_videos=2, clips_per_video=4, fps=15, clip_seconds=1.6, size=32)


@pytest.fixture(scope="module")
def shared_sentence_data(tmp_path_factory):
    """The synthetic files with test rows 0 and 1 saying the same narration, which the sentence CSV holds once (under
    row 0's id, relevant 1 to both), and row 0's video missing."""
    root = tmp_path_factory.mktemp("synth") / "ds"
    synth.generate(root, seed=5, workers=1, **TINY)
    epic = root / "epic"
    with open(epic / "EPIC_100_retrieval_test.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    rows[1][header.index("narration")] = rows[0][header.index("narration")]
    rows[0][header.index("video_id")] = "no_such_video"
    with open(epic / "EPIC_100_retrieval_test.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    with open(epic / "EPIC_100_retrieval_test_sentence.csv", newline="") as f:
        sentences = list(csv.reader(f))
    del sentences[2]  # row 1's own sentence: now row 0's
    with open(epic / "EPIC_100_retrieval_test_sentence.csv", "w", newline="") as f:
        csv.writer(f).writerows(sentences)
    path = epic / "relevancy" / "caption_relevancy_EPIC_100_retrieval_test.npy"
    relevancy = np.load(path)
    relevancy[1, 0] = 1.0
    np.save(path, np.delete(relevancy, 1, axis=1))
    return root


def test_lax_epic_finetuning_evaluates_a_test_split_with_a_missing_video(
    shared_sentence_data, demo_tokenizer_dir, tmp_path, capsys
):
    """finetune_epic_mir.json is lax. Before, the evaluation left the shared sentence out with row 0, so row 1 had
    no sentence of relevancy 1 and the run, its epoch trained, stopped in its evaluation ('clip 0 has no relevant
    item'); nor did it say that its numbers cover part of the test split."""
    checkpoint, _ = saved_random_tiny(tmp_path / "init", seed=3)
    config = {
        "task": "epic_mir",
        "model": {"preset": "tiny", "num_frames": 4, "init_from": str(checkpoint)},
        "data": {
            "root": str(shared_sentence_data),
            "annotations": "epic",
            "video_root": "epic/videos",
            "egomcq_json": None,
            "meta_json": None,
            "strict": False,
            "backend": "pyav",
            "tokenizer": str(demo_tokenizer_dir),
            "text_max_length": 30,
            "num_workers": 0,
        },
        "optim": {"lr": 1e-3, "warmup_fraction": 0.0},
        "schedule": {"epochs": 1, "batch_size": 4, "max_steps": 1, "precision": "fp32"},
        "checkpoint": {"every_steps": 10, "keep_last": 1},
        "eval": {"every_epochs": 1, "batch_size": 4},
        "log": {"every_steps": 1},
        "seed": 2,
    }
    summary = train(TrainConfig.from_dict(config), tmp_path / "run", progress=False)
    assert summary["steps"] == 1 and all(0 < v <= 100 for v in summary["epic_mir"].values())
    err = capsys.readouterr().err
    assert "note: EK-100 MIR: 1 of 8 test rows skipped (missing video: 1): the metrics cover the rest" in err


def test_eval_lax_says_what_it_left_out_of_the_split(shared_sentence_data, demo_tokenizer_dir, tmp_path, capsys):
    model, _ = saved_random_tiny(tmp_path / "tiny", seed=3)
    argv = ["eval", "--model", str(model), "--tokenizer", str(demo_tokenizer_dir), "--device", "cpu", "--frames", "2"]
    epic = ["--epic-mir", str(shared_sentence_data / "epic"), "--json"]
    assert main([*argv, *epic]) == 2  # strict: the missing video is an error, naming its row
    assert "EPIC_100_retrieval_test.csv: line 2: missing video" in capsys.readouterr().err
    assert main([*argv, *epic, "--lax"]) == 0
    out, err = capsys.readouterr()
    assert "note: EK-100 MIR: 1 of 8 test rows skipped (missing video: 1)" in err and '"mAP_AVG"' in out


def test_lax_charades_eval_note_counts_a_duplicate_row(shared_sentence_data, demo_tokenizer_dir, tmp_path):
    """A Charades-Ego test split read in lax mode whose rows were skipped says so before its mAP."""
    from egovlp_deploy.evaluation import charades_test_dataset, skipped_note

    annotations = tmp_path / "charades"
    shutil.copytree(shared_sentence_data / "charades", annotations, symlinks=True)
    path = annotations / "CharadesEgo_v1_test_only1st.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, lines[1]]) + "\n")  # the first video's row again
    videos = shared_sentence_data / "charades" / "videos"
    dataset = charades_test_dataset(annotations, videos, 2, 32, num_classes=46, strict=False)
    note = skipped_note("Charades-Ego", dataset)
    assert len(dataset) == 2 and note.startswith("note: Charades-Ego: 1 of 3 test rows skipped (duplicate id: 1)")


SHARDED_ENCODE = """
import os
import sys
import torch
import torch.distributed as dist
from egovlp_deploy.evaluation import _encode_split
dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_ADDR/PORT from the environment
try:
    results, counts = [], []
    for size in (5, 1):  # uneven shards, and a rank with no item
        items = [{"x": torch.tensor([float(i)]), "label": torch.tensor(i), "video": torch.zeros(1),
                  "load_failed": torch.tensor(int(i == 3))} for i in range(size)]
        counts.append({})
        results.append(_encode_split(items, lambda b: (b["x"] * 2, b["label"]), 2, 0, False, "test", counts[-1]))
    torch.save((results, counts), f"{sys.argv[1]}/{os.environ['RANK']}.pt")
finally:
    dist.destroy_process_group()
"""


def test_evaluation_is_sharded_over_the_ranks_and_gathered_in_dataset_order(tmp_path):
    """The fine-tuning evaluation ran on rank 0 while the other ranks waited at a barrier: on 8 GPUs, a test split
    read by one of them can outlast NCCL's 10-minute collective timeout. Every rank now encodes its share (two gloo
    ranks in processes of their own, each saving what it gathered)."""
    import sys

    import torch

    codes, errors = two_ranks([sys.executable, "-c", SHARDED_ENCODE, str(tmp_path)], timeout=120)
    assert codes == [0, 0], errors
    for rank in range(2):
        results, counts = torch.load(tmp_path / f"{rank}.pt")
        for size, (doubled, labels) in zip((5, 1), results):
            assert doubled.flatten().tolist() == [2.0 * i for i in range(size)] and labels.tolist() == list(range(size))
        # the clips scored as black clips (item 3, read by rank 1), summed over the ranks on every rank
        assert counts == [{"load_failures": 1, "clips": 5}, {"load_failures": 0, "clips": 1}]
