"""The fine-tuning data paths on data as users have it, as the EgoClip path (tests/trainer/test_train_data_wild.py):
EK-100 MIR and Charades-Ego training frames of large source videos are scaled down as they are decoded (a source
within the bound, as the official 256-px copies, is read and transformed as before, bit for bit; the test splits keep
full-size frames for the official eval transform), and their checkpoints record the sizes of the training videos, so
a mid-epoch resume on a replaced video is refused."""

from __future__ import annotations

import random
import shutil
import tracemalloc

import numpy as np
import pytest
import torch

from egovlp_deploy import preprocess, transforms
from egovlp_deploy.data import charades
from egovlp_deploy.data.charades import CharadesEgoDataset, read_charades_clip
from egovlp_deploy.data.egoclip import item_seeds, pad_frames
from egovlp_deploy.data.epic import EpicMIRDataset, read_epic_clip
from egovlp_deploy.data.errors import DataError
from official_format import saved_random_tiny
from training_cli import tiny_synth_data, train_here
from video_files import write_blocks

EPIC_HEADER = (
    "narration_id,participant_id,video_id,narration_timestamp,start_timestamp,stop_timestamp,start_frame,"
    "stop_frame,narration,verb,verb_class,noun,noun_class,all_nouns,all_noun_classes\n"
)
CHARADES_TEST_HEADER = "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"


def _epic(root, width: int, height: int, split: str, **kw) -> EpicMIRDataset:
    """EK-100 MIR files of `split` with one 0.2-1.8 s row of one 2-s video of width x height."""
    write_blocks(root / "videos" / "P01" / "P01_01.MP4", width, height)
    csv = root / f"EPIC_100_retrieval_{split}.csv"
    csv.write_text(
        EPIC_HEADER + "P01_01_0,P01,P01_01,00:00:01.00,00:00:00.20,00:00:01.80,2,18,cut,c,0,x,0,\"['x']\",[0]\n"
    )
    sentences = root / f"EPIC_100_retrieval_{split}_sentence.csv"
    sentences.write_text("narration_id,narration\nP01_01_0,cut\n")
    np.save(root / "relevancy.npy", np.ones((1, 1)))
    return EpicMIRDataset(
        csv, root / "videos", split=split, sentence_csv=sentences, relevancy_path=root / "relevancy.npy", **kw
    )


def _charades(root, width: int, height: int, split: str, **kw) -> CharadesEgoDataset:
    """Charades-Ego files of `split` with one row of one 2-s video of width x height ([0.2, 1.8] s in train)."""
    write_blocks(root / "videos" / "AB12EGO.mp4", width, height)
    if split == "train":
        csv = root / "metadata_train.csv"
        csv.write_text("id\tcls\tt_start\tt_end\tnarration\nAB12EGO\t3\t0.2\t1.8\tOpening a door\n")
    else:
        csv = root / "CharadesEgo_v1_test_only1st.csv"
        csv.write_text(CHARADES_TEST_HEADER + 'AB12EGO,S1,K,6,7,Yes,"A door.",door,"Opens.","c003 0.00 1.00",2.0\n')
    return CharadesEgoDataset(csv, root / "videos", split=split, num_classes=10, **kw)


BUILDERS = {"epic": _epic, "charades": _charades}


def _record_shapes(monkeypatch) -> tuple[list, list]:
    """The frame shapes the train transform (`to_float_clip`) and the eval transform (`eval_clip`) are given."""
    train_seen, eval_seen = [], []
    to_float, eval_clip = transforms.to_float_clip, preprocess.eval_clip
    monkeypatch.setattr(transforms, "to_float_clip", lambda f, *a: train_seen.append(tuple(f.shape)) or to_float(f, *a))
    monkeypatch.setattr(
        preprocess, "eval_clip", lambda f, *a, **k: eval_seen.append(tuple(f.shape)) or eval_clip(f, *a, **k)
    )
    return train_seen, eval_seen


@pytest.mark.parametrize("dataset", ["epic", "charades"])
def test_large_training_frames_are_scaled_down_as_they_are_decoded(tmp_path, monkeypatch, dataset):
    """A 640x360 source trained at size 32 (frames bounded to a 64-px short side): the train transform gets 64-px
    frames, and the decoded full-size frames are never held together (numpy's allocations, which tracemalloc sees:
    before, the reader stacked the 4 of a clip at full size before the transform). Charades-Ego's floor for its
    official 480-px copies is lifted here, so that a small source shows the bound."""
    monkeypatch.setattr(charades, "OFFICIAL_SHORT_SIDE", 0)
    ds = BUILDERS[dataset](tmp_path, 640, 360, "train", num_frames=4, size=32, backend="pyav", seed=0)
    train_seen, _ = _record_shapes(monkeypatch)
    full_frame = 640 * 360 * 3
    ds[0]  # opens the reader (its own buffers are no frames of ours)
    ds.set_epoch(1)
    tracemalloc.start()
    try:
        item = ds[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert item["video"].shape == (4, 3, 32, 32)
    assert set(train_seen) == {(4, 64, 113, 3)}  # short side 64, long side int(64 * 640 / 360)
    assert peak < 3 * full_frame, f"{peak / full_frame:.1f} full-size frames held at once"


def test_official_480_px_charades_frames_are_trained_at_their_full_size(tmp_path, monkeypatch):
    """The official fine-tuning reads CharadesEgo_v1_480: at size 224 (a bound of 448) its frames are not scaled."""
    ds = _charades(tmp_path, 640, 480, "train", num_frames=2, size=224, backend="pyav", seed=0)
    train_seen, _ = _record_shapes(monkeypatch)
    ds[0]
    assert train_seen == [(2, 480, 640, 3)]


@pytest.mark.parametrize("dataset", ["epic", "charades"])
def test_test_split_frames_keep_their_full_size(tmp_path, monkeypatch, dataset):
    """The official eval transform (resize, centre crop) reads the frames as decoded, whatever their size."""
    ds = BUILDERS[dataset](tmp_path, 640, 360, "test", num_frames=4, size=32, backend="pyav")
    _, eval_seen = _record_shapes(monkeypatch)
    assert ds[0]["video"].shape == (4, 3, 32, 32)
    assert eval_seen == [(4, 360, 640, 3)]


@pytest.mark.parametrize("backend", ["pyav", "decord"])
@pytest.mark.parametrize("dataset", ["epic", "charades"])
def test_an_official_256_px_source_is_trained_bit_for_bit_as_before(tmp_path, dataset, backend):
    """The official case (a 256-px short side, crop 224: the bound is 448) reads and transforms every frame as the
    unbounded reader and the official train transform do, for the item's own seeds."""
    if backend == "decord":
        pytest.importorskip("decord")
    ds = BUILDERS[dataset](tmp_path, 456, 256, "train", num_frames=4, size=224, backend=backend, seed=5)
    ds.set_epoch(2)
    if dataset == "epic":
        _, s_frames, s_crop = item_seeds(5, 2, 0, 3)
        path = tmp_path / "videos" / "P01" / "P01_01.MP4"
        frames = read_epic_clip(path, 0.2, 1.8, 4, True, rng=random.Random(s_frames), backend=backend)
    else:
        s_frames, s_crop = item_seeds(5, 2, 0, 2)
        path = tmp_path / "videos" / "AB12EGO.mp4"
        frames = read_charades_clip(path, 0.2, 1.8, 4, "rand", rng=random.Random(s_frames), backend=backend)
    assert frames.shape == (4, 256, 456, 3)
    variant = "epic" if dataset == "epic" else "egoclip"
    generator = torch.Generator().manual_seed(s_crop)
    expected = pad_frames(transforms.train_transform(frames, 224, generator, variant=variant), 4)
    assert torch.equal(ds[0]["video"], expected)


# -- the training videos in the data fingerprint ------------------------------------------------------------------
def test_fine_tuning_datasets_list_the_video_files_their_rows_read(tmp_path):
    epic = _epic(tmp_path / "epic", 64, 32, "train", num_frames=2, size=16)
    assert epic.video_files() == ["P01/P01_01.MP4"]
    root = tmp_path / "charades"
    for name in ("AB12EGO", "CD34EGO"):
        write_blocks(root / "videos" / f"{name}.mp4", 64, 32)
    (root / "metadata_train.csv").write_text(
        "id\tcls\tt_start\tt_end\tnarration\nCD34EGO\t3\t0.2\t1.8\tOpening a door\n"
        "AB12EGO\t3\t0.2\t1.8\tOpening a door\nCD34EGO\t4\t0.5\t1.5\tClosing a door\n"
    )
    charades = CharadesEgoDataset(root / "metadata_train.csv", root / "videos", 2, 16, split="train", num_classes=10)
    assert charades.video_files() == ["AB12EGO.mp4", "CD34EGO.mp4"]


@pytest.fixture(scope="module")
def finetune_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "ds"
    return tiny_synth_data(root, seed=5)


def _epic_config(data, checkpoint, tokenizer, max_steps: int) -> dict:
    """The synthetic EK-100 MIR split: 8 training clips of 2 videos, 4 per step (2 steps an epoch)."""
    return {
        "task": "epic_mir",
        "model": {"preset": "tiny", "num_frames": 4, "init_from": str(checkpoint)},
        "data": {
            "root": str(data),
            "annotations": "epic",
            "video_root": "epic/videos",
            "egomcq_json": None,
            "meta_json": None,
            "backend": "pyav",
            "tokenizer": str(tokenizer),
            "text_max_length": 30,
            "num_workers": 0,
        },
        "optim": {"lr": 1e-3, "warmup_fraction": 0.0},
        "schedule": {"epochs": 1, "batch_size": 4, "max_steps": max_steps, "precision": "fp32"},
        "checkpoint": {"every_steps": 1, "keep_last": 0},
        "eval": {"every_epochs": 10, "batch_size": 4},
        "log": {"every_steps": 1},
        "seed": 2,
    }


def test_an_epic_resume_mid_epoch_on_a_replaced_training_video_is_refused(finetune_data, demo_tokenizer_dir, tmp_path):
    """Stopped after step 1 of the epoch's 2, then resumed with one training video replaced by another recording
    (the same rows and clip count): before, the fingerprint held the annotation files only and the run went on,
    reading other frames at the saved data position."""
    data = tmp_path / "data"
    shutil.copytree(finetune_data, data)  # the links become files: one of them can be replaced
    checkpoint, _ = saved_random_tiny(tmp_path / "init", seed=3)
    run = tmp_path / "run"
    summary = train_here(_epic_config(data, checkpoint, demo_tokenizer_dir, max_steps=1), run)
    assert summary["steps"] == 1
    (run / "summary.json").unlink()  # as a run killed after its first checkpoint leaves it
    first, second = sorted((data / "epic" / "videos" / "synth_train").glob("*.MP4"))
    assert first.stat().st_size != second.stat().st_size
    shutil.copy(second, first)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(
        DataError, match=r"changed since .*a video file of the 2 the rows read was replaced.*micro-batch 1"
    ):
        train_here(_epic_config(data, checkpoint, demo_tokenizer_dir, max_steps=2), run, resume=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
