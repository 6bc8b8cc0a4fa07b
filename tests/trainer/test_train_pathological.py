"""Training runs that go wrong (red-team findings): a loss that turns non-finite from the first step or until the
data runs out, a lax run whose clips cannot be decoded, and a strict run stopped by a video that does not decode
after it saved checkpoints. Each says what happened, keeps what a resume needs and can be continued."""

from __future__ import annotations

import shutil

import pytest
import torch

from egovlp_deploy.checkpoint import list_checkpoints
from egovlp_deploy.data.errors import DataError
from egovlp_deploy.trainer import objectives
from egovlp_deploy.trainer.train import TrainingError
from egovlp_deploy.trainer.training_state import load_checkpoint
from training_cli import records, small_run_data, weights
from training_cli import small_run_config as _config
from training_cli import train_here as _run

pytest.importorskip("av")

# 24 training clips / 8 per step: 3 steps per epoch, 2 epochs = 6 steps (6 micro-batches of one step each).
STEPS_PER_EPOCH, STEPS = 3, 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_run_data(tmp_path_factory.mktemp("synth") / "data")


def _non_finite_from(monkeypatch, first_call: int) -> None:
    """The objective's loss is NaN from its `first_call`-th forward (1-based) on, as a diverged model's is."""
    forward, calls = objectives.PretrainObjective.forward, [0]

    def nan_forward(self, batch, step):
        loss, parts = forward(self, batch, step)
        calls[0] += 1
        return (loss * float("nan") if calls[0] >= first_call else loss), parts

    monkeypatch.setattr(objectives.PretrainObjective, "forward", nan_forward)


def _corrupt(video) -> None:
    """Cut a video to its first third: its index (written at the end) is gone and no reader opens it."""
    raw = video.read_bytes()
    video.write_bytes(raw[: len(raw) // 3])


def test_a_run_that_never_takes_a_step_fails_and_leaves_no_checkpoint(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _non_finite_from(monkeypatch, 1)
    with pytest.raises(TrainingError, match=f"no step was taken: all {STEPS} steps had a non-finite loss"):
        _run(_config(data), run)
    assert list_checkpoints(run / "checkpoints") == [] and not (run / "summary.json").exists()
    skips = [r["skipped_nonfinite"] for r in records(run) if "skipped_nonfinite" in r]
    assert skips == list(range(1, STEPS + 1))
    monkeypatch.undo()  # the corrected rerun takes the folder over as a new run
    assert _run(_config(data), run)["steps"] == STEPS


def test_a_run_diverging_until_its_data_ends_keeps_the_last_good_position(data, tmp_path, monkeypatch, capsys):
    clean = tmp_path / "clean"
    assert _run(_config(data), clean)["steps"] == STEPS
    run = tmp_path / "run"
    _non_finite_from(monkeypatch, 3)  # steps 1 and 2 train; the rest of the data diverges
    summary = _run(_config(data), run)
    assert (summary["steps"], summary["skipped_steps"]) == (2, STEPS - 2)
    err = capsys.readouterr().err
    newest = list_checkpoints(run / "checkpoints")[-1]
    _, state, _ = load_checkpoint(newest)
    assert (newest.name, state["epoch"], state["next_micro"]) == ("step_00000002", 0, 2)  # before the bad batches
    monkeypatch.undo()  # a resume (as with a lower learning rate) trains the batches that diverged
    assert _run(_config(data), run, resume=True)["steps"] == STEPS
    for key, value in weights(clean, STEPS).items():  # as the run that never diverged, bit for bit
        assert torch.equal(weights(run, STEPS)[key], value), key
    assert f"the run trained 2 of its {STEPS} planned steps" in err


def test_a_lax_run_on_undecodable_videos_says_so(data, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    for video in (root / "videos").glob("synth_train_*/*.mp4"):
        _corrupt(video)
    summary = _run(_config(root, data={"strict": False}), tmp_path / "run")
    clips = STEPS * 8 * 2  # every step's 8 clips and their scene negatives
    assert (summary["steps"], summary["load_failures"]) == (STEPS, clips)
    assert f"note: {clips} of the {clips} clips this process read could not be decoded" in capsys.readouterr().err


def test_a_strict_run_stopped_by_an_undecodable_eval_video_says_how_to_go_on(data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    video = next((root / "videos").glob("synth_eval_*/*.mp4"))
    kept = video.read_bytes()
    _corrupt(video)
    run = tmp_path / "run"
    config = _config(root, eval={"max_questions": None})  # every question: the corrupt video is read
    with pytest.raises(DataError, match=f"checkpoints up to step_{STEPS_PER_EPOCH:08d} are kept: add --resume"):
        _run(config, run)  # at the evaluation after the first epoch
    video.write_bytes(kept)
    assert _run(config, run, resume=True)["steps"] == STEPS
    evaluations = [r["step"] for r in records(run) if "pretrain" in r]
    assert evaluations == [STEPS_PER_EPOCH, STEPS]  # the interrupted evaluation once, redone


def test_an_epoch_end_save_in_a_divergence_keeps_the_last_good_position(data, tmp_path, monkeypatch):
    """The last good step (2) is not saved when the loss turns non-finite (checkpoints only at the epoch's end): the
    epoch-end save holds step 2's position (epoch 0, micro-batch 2), not the next epoch's start, which would make a
    resume skip the batch that diverged."""
    run = tmp_path / "run"
    _non_finite_from(monkeypatch, 3)
    _run(_config(data, checkpoint={"every_steps": 100}), run)
    newest = list_checkpoints(run / "checkpoints")[-1]
    _, state, _ = load_checkpoint(newest)
    assert (newest.name, state["epoch"], state["next_micro"]) == ("step_00000002", 0, 2)
    assert (state["skipped"], state["consecutive_skips"]) == (0, 0)  # the counts at step 2
    monkeypatch.undo()
    summary = _run(_config(data, checkpoint={"every_steps": 100}), run, resume=True)
    assert (summary["steps"], summary["skipped_steps"]) == (STEPS, 0)
