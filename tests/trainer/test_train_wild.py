"""Training as a user with a real run folder uses it (red-team findings): a resume with a changed config either
applies the change or refuses it before any work, a resumed run does not need the files it started from, a second
`train` on a running run is refused, a resume mid-epoch on other data is refused, and a run that failed in its setup
does not block the corrected rerun."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from egovlp_deploy import EgoVLPv2, EgoVLPv2Config
from egovlp_deploy.config import ConfigError
from egovlp_deploy.data.errors import DataError
from egovlp_deploy.trainer.train import TrainingError, run_lock
from official_format import randomize_
from training_cli import edit_state, killed_after, records, small_run_data, two_ranks, weights
from training_cli import small_run_config as _config
from training_cli import train_here as _run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_run_data(tmp_path_factory.mktemp("synth") / "data")


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert _run(_config(data), run)["steps"] == 6
    return run


def _tree(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def _timeless(run) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "clips_per_s"} for r in records(run)]


def _cosine(step: int, total: int) -> float:
    """The cosine schedule without warm-up, by hand: 0.5 (1 + cos(pi step / total))."""
    return 0.5 * (1 + math.cos(math.pi * step / total))


# -- a changed config on resume ----------------------------------------------------------------------------------
def test_resume_applies_a_changed_learning_rate_and_weight_decay(data, finished, tmp_path, capsys):
    """The divergence error says "lower the learning rate": a resume with a lower optim.lr (and another weight decay)
    trains with them from the resumed step on, on the same schedule, instead of the interrupted run's values."""
    run = killed_after(finished, tmp_path, 2)
    config = _config(data)
    config["optim"] |= {"lr": 1e-5, "weight_decay": 0.3}
    _run(config, run, resume=True)
    assert "optim.lr 0.001 -> 1e-05" in capsys.readouterr().err
    logged = {r["step"]: r["lr"] for r in records(run) if "lr" in r}
    for step in (1, 2):  # the interrupted run's steps stay as they were logged
        assert logged[step] == pytest.approx(1e-3 * _cosine(step, 6), rel=1e-12)
    for step in (3, 4, 5):
        assert logged[step] == pytest.approx(1e-5 * _cosine(step, 6), rel=1e-12), step
    state = json.loads((run / "checkpoints" / "step_00000006" / "state.json").read_text())
    optimizer = dict(state["__dict__"])["optimizer"]
    groups = dict(optimizer["__dict__"])["param_groups"]["__list__"]
    decays = {dict(g["__dict__"])["weight_decay"] for g in groups}
    assert decays == {0.0, 0.3}  # the no-decay groups (biases, norms) and the decayed ones at the new value


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("schedule", "batch_size", 4),
        ("seed", None, 4),
        ("schedule", "grad_accum_steps", 2),
        ("model", "num_frames", 2),
        ("data", "tokenizer", "/models/another-tokenizer"),
    ],
)
def test_resume_refuses_a_change_of_what_the_steps_mean_before_any_work(data, finished, tmp_path, section, key, value):
    """Another batch size, seed, accumulation, frame count or tokenizer makes the checkpoint's step and data position
    (or its text embeddings' ids) mean something else (with batch_size 4 the old run had silently "finished" at
    once): refused, naming the key, with nothing in the run folder changed."""
    run = killed_after(finished, tmp_path, 2)
    before = _tree(run)
    config = _config(data)
    if key is None:
        config[section] = value
    else:
        config[section][key] = value
    name = section if key is None else f"{section}.{key}"
    with pytest.raises(ConfigError, match=rf"--resume: {name} \S+ -> {re.escape(repr(value))}: .*step_00000002"):
        _run(config, run, resume=True)
    assert _tree(run) == before


def test_resume_mid_epoch_on_data_of_another_size_is_refused(data, finished, tmp_path):
    """The data position (micro-batch 2 of epoch 0) indexes that epoch's shuffled order of 24 clips: with two rows
    removed it would skip and repeat clips, so the resume is refused, naming both counts."""
    run = killed_after(finished, tmp_path, 2)
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for name in ("egomcq.json", "meta.json"):
        shutil.copy(data / name, fewer / name)
    (fewer / "videos").symlink_to(data / "videos")
    lines = (data / "egoclip.csv").read_text().splitlines(keepends=True)
    (fewer / "egoclip.csv").write_text("".join(lines[:-2]))
    config = _config(fewer)
    with pytest.raises(DataError, match="has 22 clips, .*step_00000002 was saved with 24"):
        _run(config, run, resume=True)


def _resized_copy(data, tmp_path, rows: int):
    """`data` with its EgoClip rows cut to their first `rows` (fewer) or the first ones repeated (more)."""
    copy = tmp_path / f"rows_{rows}"
    copy.mkdir()
    for name in ("egomcq.json", "meta.json"):
        shutil.copy(data / name, copy / name)
    (copy / "videos").symlink_to(data / "videos")
    header, *lines = (data / "egoclip.csv").read_text().splitlines(keepends=True)
    (copy / "egoclip.csv").write_text(header + "".join((lines * 2)[:rows]))
    return copy


@pytest.mark.parametrize("rows, epochs, resumed_epochs", [(16, 4, [2, 2, 3, 3]), (32, 3, [2, 2, 2, 2])])
def test_resume_at_the_end_of_a_run_on_data_of_another_size_trains_the_next_epochs(
    data, finished, tmp_path, rows, epochs, resumed_epochs
):
    """The finished run ended on epoch 1's last step (position: micro-batch 3 of epoch 1's 3): nothing of that epoch
    is left to read, so a resume with more epochs on fewer or more clips goes on with epoch 2 in the new data's
    order. It neither trains the rest of a bigger epoch 1 nor is refused for the clip count, and its length is the
    6 steps taken plus the new epochs at the new size (16 clips: 2 steps each, 32 clips: 4), the schedule planned
    for it to its end."""
    run = killed_after(finished, tmp_path, 6)
    summary = _run(_config(_resized_copy(data, tmp_path, rows), schedule={"epochs": epochs}), run, resume=True)
    total = 6 + len(resumed_epochs)
    assert summary["steps"] == total
    resumed = [r for r in records(run) if "loss" in r and r["step"] > 6]
    assert [(r["step"], r["epoch"]) for r in resumed] == [(7 + k, e) for k, e in enumerate(resumed_epochs)]
    for r in resumed:
        assert r["lr"] == pytest.approx(1e-3 * _cosine(r["step"], total), abs=1e-12), r["step"]


def test_an_evaluation_that_fails_at_an_epoch_end_loses_no_training(data, finished, tmp_path, monkeypatch):
    """With checkpoints rarer than epochs (the pre-training recipe: every 500 steps, 488 per epoch), an evaluation
    that fails at an epoch's end (out of memory at its frame count, a damaged question video, a kill) lost the whole
    epoch. The epoch's checkpoint is saved before its evaluation, which leaves every random generator as it found
    it; the resume evaluates again and ends as the uninterrupted run: the same weights and log, each row once."""
    import egovlp_deploy.trainer.train as T

    real, calls = T.evaluate_egomcq, []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (a stand-in)")
        return real(*args, **kwargs)

    config = _config(data, checkpoint={"every_steps": 100, "keep_last": 0})
    run = tmp_path / "run"
    monkeypatch.setattr(T, "evaluate_egomcq", failing_once)
    with pytest.raises(RuntimeError, match="a stand-in"):
        _run(config, run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003"]
    _run(config, run, resume=True)
    assert len(calls) == 3  # the failed one, its rerun at the resume, the final one (epoch 1 ends the run)
    a, b = weights(finished, 6), weights(run, 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _timeless(run) == _timeless(finished)


def test_a_lax_pretraining_run_says_which_egomcq_questions_it_leaves_out(data, tmp_path, capsys):
    """Lax mode skips a bad EgoMCQ question (here an answer out of range): the run says so at its start, as the
    fine-tuning runs do for their test rows, so its accuracy is not taken for the whole set's."""
    copy = _resized_copy(data, tmp_path, 24)
    questions = json.loads((data / "egomcq.json").read_text())
    questions[next(iter(questions))]["answer"] = 9
    (copy / "egomcq.json").write_text(json.dumps(questions))
    _run(_config(copy, data={"strict": False}, schedule={"max_steps": 1}), tmp_path / "run")
    assert f"note: EgoMCQ: 1 of {len(questions)} questions skipped (" in capsys.readouterr().err


def _counting_evaluations(monkeypatch) -> list:
    import egovlp_deploy.trainer.train as T

    real, calls = T.evaluate_egomcq, []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "evaluate_egomcq", counting)
    return calls


def test_an_epoch_end_evaluation_logged_before_a_kill_is_not_repeated(data, finished, tmp_path, monkeypatch):
    """Killed after epoch 0's end was saved and evaluated (step 3's checkpoint records its evaluation as due): the
    resume keeps the logged evaluation instead of running it again; only the final one runs."""
    calls = _counting_evaluations(monkeypatch)
    run = killed_after(finished, tmp_path, 3)
    _run(_config(data), run, resume=True)
    assert len(calls) == 1
    assert _timeless(run) == _timeless(finished)


def test_a_checkpoint_saved_after_its_evaluation_by_an_older_trainer_is_not_evaluated_again(
    data, finished, tmp_path, monkeypatch
):
    """Older trainers saved an epoch's end after its evaluation (the log rows counted include it, no due flag): the
    resume goes on with the next epoch, each log row once."""
    run = killed_after(finished, tmp_path, 3)

    def as_an_older_trainer_saved_it(keys):
        del keys["evaluation_due"], keys["planned_steps_before_epoch"]
        keys["log_rows"] += 1

    edit_state(run / "checkpoints" / "step_00000003", as_an_older_trainer_saved_it)
    calls = _counting_evaluations(monkeypatch)
    _run(_config(data), run, resume=True)
    assert len(calls) == 1
    assert _timeless(run) == _timeless(finished)


def test_a_resumed_run_does_not_hold_the_loaded_copy_of_the_weights(data, finished, tmp_path, monkeypatch):
    """The checkpoint's weights are copied into the model at the resume; the loaded copy (on the training device:
    a second model's worth of GPU memory for the base model) is freed before the run trains."""
    import gc
    import weakref

    import egovlp_deploy.trainer.train as T

    real_load, real_eval, loaded, alive = T.load_checkpoint, T.evaluate_egomcq, [], []

    def load(*args, **kwargs):
        weights, state, extra = real_load(*args, **kwargs)
        loaded.extend(weakref.ref(t) for t in weights.values())
        return weights, state, extra

    def evaluate(*args, **kwargs):
        gc.collect()
        alive.append(sum(ref() is not None for ref in loaded))
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(T, "load_checkpoint", load)
    monkeypatch.setattr(T, "evaluate_egomcq", evaluate)
    run = killed_after(finished, tmp_path, 5)
    _run(_config(data), run, resume=True)
    assert len(loaded) > 100 and alive == [0]


def test_an_output_folder_whose_path_is_not_utf8_is_refused_before_it_is_made(data, tmp_path):
    """The demo tokenizer is saved in the run folder by Hugging Face tokenizers, which takes UTF-8 file names only:
    a folder named with other bytes failed after the data was read, with a bare codec error and a temp folder left
    behind. Refused first, naming the folder, with nothing made."""
    from egovlp_deploy.tokenizer import TokenizerError

    out = Path(os.fsdecode(bytes(tmp_path) + b"/run\xff"))
    with pytest.raises(TokenizerError, match=r"run\\xff/tokenizer: not valid UTF-8"):
        _run(_config(data), out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("row", [b"[1, 2]\n", b"null\n", b'{"step": 3, "epoch": 1, "data": {}}\n', b'{"step": 3, "ep'])
def test_a_row_after_the_checkpoint_that_is_no_evaluation_is_not_taken_for_one(tmp_path, row):
    from egovlp_deploy.trainer.train import logged_evaluation

    log = tmp_path / "metrics.jsonl"
    log.write_bytes(b'{"step": 0}\n' + row)
    assert logged_evaluation(log, 1, 3) is None
    log.write_bytes(b'{"step": 0}\n{"step": 3, "epoch": 1, "pretrain": {"dual": 20.0}}\n')
    assert logged_evaluation(log, 1, 3) == {"dual": 20.0}


# -- what a resume reads -----------------------------------------------------------------------------------------
def test_resume_does_not_need_the_checkpoint_the_run_started_from(data, tmp_path):
    """model.init_from (a pre-trained checkpoint, perhaps pruned by its own run's keep_last since) is read when the
    run starts; the resume builds the model from its own checkpoint and ends as the uninterrupted run."""
    init = EgoVLPv2(EgoVLPv2Config.tiny())
    randomize_(init, seed=5)
    init.save_pretrained(tmp_path / "init")
    config = _config(data, schedule={"max_steps": 4})
    config["model"]["init_from"] = str(tmp_path / "init")
    config["model"]["text_dropout"] = 0.0
    _run(config, tmp_path / "straight")
    run = tmp_path / "run"  # as a kill right after checkpoint 2 leaves it
    shutil.copytree(tmp_path / "straight", run)
    for step in (3, 4):
        shutil.rmtree(run / "checkpoints" / f"step_{step:08d}")
    shutil.rmtree(tmp_path / "init")
    _run(config, run, resume=True)
    a, b = weights(tmp_path / "straight", 4), weights(tmp_path / "run", 4)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


# -- the run folder ----------------------------------------------------------------------------------------------
def test_a_run_that_failed_in_its_setup_does_not_block_the_corrected_rerun(data, tmp_path, capsys):
    """A batch larger than the data (as a bad row in strict mode) is found after the demo tokenizer is written: the
    corrected command, rerun as it was (no --resume: there is nothing to continue), trains, its log holding one
    data row."""
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _run(_config(data, schedule={"batch_size": 32}), run)
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    (run / "metrics.jsonl").write_text('{"step": 0, "epoch": 0, "data": {"clips": 24}}\n')  # had it got that far
    summary = _run(_config(data, schedule={"max_steps": 1}), run)
    assert summary["steps"] == 1
    assert "stopped before its first step" in capsys.readouterr().err
    assert [("data" in r, r["step"]) for r in records(run)][:2] == [(True, 0), (False, 1)]
    assert sum("data" in r for r in records(run)) == 1


def test_a_second_train_on_a_running_run_is_refused_and_leaves_its_save_alone(data, finished, tmp_path):
    """While one train process writes the run (it holds the folder's lock), a second one (a --resume in another
    terminal, a restarted job) is refused before it removes the running save's temp directory."""
    run = killed_after(finished, tmp_path, 2)
    saving = run / "checkpoints" / ".step_00000003.abcdefgh"
    saving.mkdir()
    with run_lock(run, resume=True):
        with pytest.raises(TrainingError, match="another process is writing this training run now"):
            _run(_config(data), run, resume=True)
        with pytest.raises(TrainingError, match="another process is writing this training run"):
            _run(_config(data), run, resume=False)
    assert saving.is_dir()


def test_a_forked_child_does_not_keep_the_run_locked(tmp_path):
    """A DataLoader worker forked while the lock is held (it outlives a SIGKILLed trainer by seconds) must not keep
    the folder locked for the resume."""
    read, write = os.pipe()
    with run_lock(tmp_path, resume=True):
        child = os.fork()
        if child == 0:  # a worker: up and running (the fork handlers done), then alive past the parent's lock
            os.write(write, b"up")
            time.sleep(3)
            os._exit(0)
        assert os.read(read, 2) == b"up"
    try:
        with run_lock(tmp_path, resume=True):
            pass
    finally:
        os.waitpid(child, 0)


def test_a_refused_run_lock_stops_every_process_of_a_launch(data, tmp_path):
    """Only rank 0 takes the run's lock. When it is refused, the other ranks must stop as well: under a launcher
    without torchrun's agent (srun, mpirun: here two processes started by hand) they would otherwise wait for rank 0
    at their first collective until the process group's timeout."""
    import sys
    from pathlib import Path

    run = tmp_path / "run"
    run.mkdir()
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps(_config(data)))
    cmd = [str(Path(sys.executable).parent / "egovlp-deploy"), "train", "--config", str(config_file)]
    with run_lock(run, resume=True):
        codes, errors = two_ranks([*cmd, "--output", str(run), "--no-progress"])
    assert codes == [1, 1]
    assert all("another process is writing this training run now" in e for e in errors), errors


FAST_CLOCK_RANK = """
import os, sys, time
if os.environ["RANK"] == "1":  # this rank's clock runs 10,000 times faster: its time budget is spent at once
    real, t0 = time.time, time.time()
    time.time = lambda: t0 + (real() - t0) * 10_000
from egovlp_deploy.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ranks_whose_clocks_disagree_stop_at_the_same_step(data, tmp_path):
    """`schedule.max_minutes` is decided by rank 0's clock: ranks that decided by their own (started at other
    moments, or on other machines) stopped at different steps and waited in different collectives (a hang)."""
    import sys

    run = tmp_path / "run"
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps(_config(data, schedule={"max_minutes": 1.0, "max_steps": 3})))
    cmd = [sys.executable, "-c", FAST_CLOCK_RANK, "train", "--config", str(config_file), "--output", str(run)]
    codes, errors = two_ranks([*cmd, "--no-progress"])
    assert codes == [0, 0], errors
    assert json.loads((run / "summary.json").read_text())["steps"] == 3  # rank 0's budget was not spent


def test_a_run_refused_before_it_writes_leaves_no_folder(data, tmp_path, monkeypatch):
    """The run's lock is taken on the output folder, created for it: a run refused by a check before anything is
    written (here the batch split for this launch) removes the folder it created, and only that."""
    from egovlp_deploy.trainer import train as train_module

    def refuse(cfg, world_size):
        raise ValueError("refused for this launch")

    monkeypatch.setattr(train_module, "check_batch_split", refuse)
    with pytest.raises(ValueError, match="refused for this launch"):
        _run(_config(data), tmp_path / "new" / "run")
    assert not (tmp_path / "new" / "run").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(ValueError, match="refused for this launch"):
        _run(_config(data), tmp_path / "mine")
    assert (tmp_path / "mine").is_dir()  # not created by the run: left


def test_a_lax_run_says_how_many_evaluation_clips_it_scored_as_black(data, tmp_path, capsys):
    """Lax data scores an EgoMCQ candidate whose video cannot be decoded as the black clip. The evaluation reads its
    clips in DataLoader workers, whose loaders count the failures where the main process never sees them: the
    count travels with the items, and the run says it and logs it beside the accuracy."""
    copy = _resized_copy(data, tmp_path, 24)
    (copy / "videos").unlink()
    (copy / "videos").mkdir()
    for video in (data / "videos").iterdir():
        (copy / "videos" / video.name).symlink_to(video)
    broken = "synth_eval_0001"
    (copy / "videos" / broken).unlink()
    (copy / "videos" / broken).mkdir()
    (copy / "videos" / broken / "0.mp4").write_bytes((data / "videos" / broken / "0.mp4").read_bytes()[:2000])
    questions = list(json.loads((data / "egomcq.json").read_text()).values())[:2]  # eval.max_questions
    expected = sum(c["video_uid"] == broken for q in questions for c in q["choices"].values())
    clips = sum(len(q["choices"]) for q in questions)
    assert 0 < expected < clips
    config = _config(copy, data={"strict": False, "num_workers": 1}, schedule={"max_steps": 1})
    _run(config, tmp_path / "run")
    err = capsys.readouterr().err
    assert f"{expected} of the {clips} EgoMCQ clips could not be decoded and were scored as black clips" in err
    (evaluation,) = [r for r in records(tmp_path / "run") if "pretrain" in r]  # the evaluation at the run's end
    assert (evaluation["eval_load_failures"], evaluation["eval_clips"]) == (expected, clips)


def test_a_tokenizer_that_does_not_frame_texts_with_the_models_ids_is_refused(data, finished, tmp_path):
    """The trainer checked the tokenizer's length and pad id only: one that starts texts with </s> (the text
    embedding is the first token's state) trained a model on the wrong token's embeddings, silently."""
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(finished / "tokenizer", tokenizer)
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config | {"cls_token": "</s>", "bos_token": "</s>"}))
    with pytest.raises(TrainingError, match="the tokenizer does not fit the model: tokenizer encodes 'a' as '</s> a"):
        _run(_config(data, data={"tokenizer": str(tokenizer)}), tmp_path / "run")


def test_a_checkpoint_that_cannot_be_saved_stops_the_run_naming_the_ones_kept(data, tmp_path, monkeypatch):
    """A full disk at a checkpoint was a bare OSError (exit 2, a bad input's status); the run stops as one that
    cannot go on (exit 1) and says which checkpoints it keeps for --resume."""
    import errno

    import egovlp_deploy.trainer.train as T

    real = T.save_checkpoint

    def full_disk(directory, step, *args, **kwargs):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(directory, step, *args, **kwargs)

    monkeypatch.setattr(T, "save_checkpoint", full_disk)
    with pytest.raises(TrainingError, match=r"checkpoint of step 2 .*\(No space left on device\): the checkpoints "
                       r"up to step_00000001 are kept: add --resume"):  # fmt: skip
        _run(_config(data), tmp_path / "run")
