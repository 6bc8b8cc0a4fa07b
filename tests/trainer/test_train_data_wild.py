"""The training data path on data as users have it (red-team findings): frames of large source videos are scaled down
as they are decoded (an official 256-px chunk is read and transformed as before, bit for bit), a mid-epoch resume
on edited rows or a replaced video with the same clip count is refused, and lax-mode load-failure counts continue
across a resume."""

from __future__ import annotations

import json
import random
import shutil
import tracemalloc

import pytest
import torch

from egovlp_deploy import transforms
from egovlp_deploy.data.egoclip import EgoClipDataset, item_seeds, pad_frames
from egovlp_deploy.data.errors import DataError
from egovlp_deploy.decoding import read_egoclip_clip
from training_cli import edit_state, killed_after, records, small_run_data
from training_cli import small_run_config as _config
from training_cli import train_here as _run
from video_files import write_blocks

HEADER = (
    "video_uid\tvideo_dur\tnarration_source\tnarration_ind\tnarration_time\tclip_start\tclip_end\tclip_text\t"
    "tag_verb\ttag_noun\n"
)


def _egoclip(root, width: int, height: int, rows: int = 2):
    """root/egoclip.csv with `rows` clips of one 2-s video of width x height (root/videos/uid0/0.mp4)."""
    write_blocks(root / "videos" / "uid0" / "0.mp4", width, height)
    lines = [
        f"uid0\t2.0\tn\t{i}\t{0.5 + i * 0.1}\t{0.1 * i}\t{1.8 + 0.1 * i}\t#C C cuts {i}\t[1]\t[2]\n"
        for i in range(rows)
    ]
    (root / "egoclip.csv").write_text(HEADER + "".join(lines))
    return root / "egoclip.csv", root / "videos"


# -- 1. memory with large source videos -------------------------------------------------------------------------
def test_large_source_frames_are_scaled_down_as_they_are_decoded(tmp_path, monkeypatch):
    """A 640x360 source trained at size 32 (frames bounded to a 64-px short side): the train transform gets 64-px
    frames, and the decoded full-size frames are never held together (numpy's allocations, which tracemalloc sees:
    before, the reader stacked all 8 of a clip at full size before the transform)."""
    csv, videos = _egoclip(tmp_path, 640, 360)
    ds = EgoClipDataset(csv, videos, num_frames=8, size=32, backend="pyav", seed=0)
    seen = []
    to_float = transforms.to_float_clip
    monkeypatch.setattr(transforms, "to_float_clip", lambda f, *a: seen.append(tuple(f.shape)) or to_float(f, *a))
    full_frame = 640 * 360 * 3
    ds[0]  # opens the reader (its own buffers are no frames of ours)
    tracemalloc.start()
    try:
        item = ds[1]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert item["video"].shape == item["video_neg"].shape == (8, 3, 32, 32)
    assert set(seen) == {(8, 64, 113, 3)}  # short side 64, long side int(64 * 640 / 360)
    assert peak < 3 * full_frame, f"{peak / full_frame:.1f} full-size frames held at once"


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_an_official_256_px_chunk_is_trained_bit_for_bit_as_before(tmp_path, backend):
    """The official case (a 256-px short side, crop 224: the bound is 448) reads and transforms every frame as the
    unbounded reader and the official train transform do, for the item's own seeds."""
    if backend == "decord":
        pytest.importorskip("decord")
    csv, videos = _egoclip(tmp_path, 456, 256, rows=1)
    ds = EgoClipDataset(csv, videos, num_frames=4, size=224, backend=backend, neg_window=None, seed=5)
    ds.set_epoch(2)
    _, s_frames, s_crop, _, _ = item_seeds(5, 2, 0, 5)
    frames = read_egoclip_clip(videos, "uid0", 0.0, 1.8, 4, "rand", rng=random.Random(s_frames), backend=backend)
    assert frames.shape == (4, 256, 456, 3)
    expected = pad_frames(transforms.train_transform(frames, 224, torch.Generator().manual_seed(s_crop)), 4)
    assert torch.equal(ds[0]["video"], expected)


def test_shrink_frames_keeps_small_frames_and_bounds_large_ones():
    small = torch.randint(0, 256, (2, 256, 456, 3), dtype=torch.uint8)
    assert transforms.shrink_frames(small, 448) is small
    big = torch.full((3, 2160, 3840, 3), 77, dtype=torch.uint8)
    out = transforms.shrink_frames(big, 448)
    assert out.dtype == torch.uint8 and out.shape == (3, 448, 796, 3)
    assert bool((out == 77).all())  # a flat image stays flat: an area average, no ringing or rounding drift


# -- 2 and 3: resume on changed data, load-failure counts ---------------------------------------------------------
@pytest.fixture(scope="module")
def lax_data(tmp_path_factory):
    """The small run's data with one training video replaced by bytes no decoder reads: lax mode trains its 6 clips
    (and any negative drawn from them) as black clips and counts them."""
    data = small_run_data(tmp_path_factory.mktemp("synth") / "data")
    broken = sorted((data / "videos").glob("synth_train_*/0.mp4"))[0]
    broken.write_bytes(b"\x00not a video\x00" * 64)
    return data


@pytest.fixture(scope="module")
def finished(lax_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    summary = _run(_config(lax_data, data={"strict": False}), run)
    assert summary["steps"] == 6 and summary["load_failures"] > 0
    return run


def _data_copy(lax_data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(lax_data, copy)
    return copy


def _edit_a_narration(data):
    csv = data / "egoclip.csv"
    lines = csv.read_text().splitlines(keepends=True)
    fields = lines[5].split("\t")
    fields[7] = fields[7] + " slowly"  # clip_text: the same number of rows, one of them another clip
    lines[5] = "\t".join(fields)
    csv.write_text("".join(lines))


def test_resume_mid_epoch_on_edited_rows_of_the_same_count_is_refused(lax_data, finished, tmp_path):
    run = killed_after(finished, tmp_path, 2)  # micro-batch 2 of epoch 0's 3
    data = _data_copy(lax_data, tmp_path)
    _edit_a_narration(data)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(DataError, match=r"changed since .*step_00000002 .*egoclip\.csv was edited.*micro-batch 2 of"):
        _run(_config(data, data={"strict": False}), run, resume=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_resume_mid_epoch_on_a_replaced_video_is_refused(lax_data, finished, tmp_path):
    run = killed_after(finished, tmp_path, 2)
    data = _data_copy(lax_data, tmp_path)
    first, second = sorted((data / "videos").glob("synth_train_*/0.mp4"))[1:3]
    assert first.stat().st_size != second.stat().st_size
    shutil.copy(second, first)  # the same rows, one video now another recording
    with pytest.raises(DataError, match=r"changed since .*a video file of the \d+ the rows read was replaced"):
        _run(_config(data, data={"strict": False}), run, resume=True)


@pytest.mark.parametrize(
    "step, schedule, epoch",
    [
        (3, {"max_steps": 4}, 1),  # saved at the end of epoch 0: the position is epoch 1's start
        (6, {"epochs": 3, "max_steps": 7}, 2),  # the run's end, past epoch 1's last step
    ],
)
def test_resume_at_an_epoch_end_on_edited_rows_goes_on_with_a_note(
    lax_data, finished, tmp_path, capsys, step, schedule, epoch
):
    run = killed_after(finished, tmp_path, step)
    data = _data_copy(lax_data, tmp_path)
    _edit_a_narration(data)
    summary = _run(_config(data, data={"strict": False}, schedule=schedule), run, resume=True)
    assert summary["steps"] == step + 1
    err = capsys.readouterr().err
    assert "egoclip.csv was edited (sha256 " in err
    assert f"continues on it from the start of epoch {epoch}" in err


def test_an_older_checkpoint_without_a_fingerprint_or_counts_resumes_with_a_note(lax_data, finished, tmp_path, capsys):
    run = killed_after(finished, tmp_path, 2)
    for key in ("data_fingerprint", "load_failures", "clips_read"):
        edit_state(run / "checkpoints" / "step_00000002", lambda keys, key=key: keys.pop(key))
    summary = _run(_config(lax_data, data={"strict": False}, schedule={"max_steps": 3}), run, resume=True)
    assert summary["steps"] == 3
    assert "records no fingerprint of its training data" in capsys.readouterr().err
    finished_rows = {r["step"]: r for r in records(finished) if "loss" in r}
    step3 = [r for r in records(run) if r.get("step") == 3 and "loss" in r][0]
    # counted from 0: only step 3's own failures
    assert step3["load_failures"] == finished_rows[3]["load_failures"] - finished_rows[2]["load_failures"]


def test_load_failure_counts_continue_across_a_resume(lax_data, finished, tmp_path):
    """Resumed after step 4 (on an unchanged copy of the data in another folder: no refusal), the logged counts of
    steps 5 and 6 and the summary's are those of the uninterrupted run, and the checkpoint holds the count."""
    run = killed_after(finished, tmp_path, 4)
    logged = {r["step"]: r for r in records(finished) if "loss" in r}
    assert logged[4]["load_failures"] > 0
    summary = _run(_config(_data_copy(lax_data, tmp_path), data={"strict": False}), run, resume=True)
    resumed = {r["step"]: r for r in records(run) if "loss" in r}
    assert [resumed[s]["load_failures"] for s in (5, 6)] == [logged[s]["load_failures"] for s in (5, 6)]
    assert summary["load_failures"] == json.loads((finished / "summary.json").read_text())["load_failures"]
    state = dict(json.loads((run / "checkpoints" / "step_00000004" / "state.json").read_text())["__dict__"])
    assert state["load_failures"]["__list__"] == [logged[4]["load_failures"]]  # one count per process
