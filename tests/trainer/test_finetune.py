"""Fine-tuning as a trainer task (`task`: "epic_mir", "charades"): the config's rules, a few steps on the synthetic
EK-100 MIR and Charades-Ego files in the official formats from a tiny checkpoint, evaluation each epoch, an exact
resume after SIGKILL, and two processes that fine-tune as one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("av")

from egovlp_deploy.config import ConfigError
from egovlp_deploy.data import synth_downstream
from egovlp_deploy.trainer import train as train_module
from egovlp_deploy.trainer.config import TrainConfig
from egovlp_deploy.trainer.train import train
from official_format import saved_random_tiny
from training_cli import TORCHRUN_TWO, kill_after_checkpoint, losses, run_train, tiny_synth_data, weights

METRICS = {"nDCG_V2T", "nDCG_T2V", "nDCG_AVG", "mAP_V2T", "mAP_T2V", "mAP_AVG"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    return tiny_synth_data(out, seed=5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model saved at 4 frames: the runs below inflate it to 8 (the frame inflation rule)."""
    path, _ = saved_random_tiny(tmp_path_factory.mktemp("init") / "tiny", seed=3)
    return path


def _config(task, data, checkpoint, tokenizer, **schedule) -> dict:
    annotations = "epic" if task == "epic_mir" else "charades"
    return {
        "task": task,
        "model": {"preset": "tiny", "num_frames": 8, "init_from": str(checkpoint)},
        "data": {
            "root": str(data),
            "annotations": annotations,
            "video_root": f"{annotations}/videos",
            "num_classes": len(synth_downstream.charades_classes()),
            "egomcq_json": None,
            "meta_json": None,
            "backend": "pyav",
            "tokenizer": str(tokenizer),
            "text_max_length": 30 if task == "epic_mir" else 15,
            "num_workers": 0,
        },
        "optim": {"lr": 1e-3, "lr_mult_head": 1.0, "lr_mult_cross_modal": 1.0, "warmup_fraction": 0.1},
        "schedule": {"epochs": 2, "batch_size": 4, "precision": "fp32"} | schedule,
        "checkpoint": {"every_steps": 1, "keep_last": 0},
        "eval": {"every_epochs": 1, "batch_size": 4},
        "log": {"every_steps": 1},
        "seed": 2,
    }


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# -- config ------------------------------------------------------------------------------------------------------
def test_shipped_finetune_configs_hold_the_official_recipes():
    epic = TrainConfig.load("finetune_epic_mir.json")
    assert (epic.task, epic.model.num_frames, epic.model.projection, epic.data.text_max_length) == (
        "epic_mir",
        16,
        "small",
        30,
    )
    assert (epic.optim.lr, epic.objective.margin, epic.schedule.epochs, epic.schedule.batch_size) == (
        2e-4,
        0.2,
        100,
        128,
    )
    charades = TrainConfig.load("finetune_charades.json")
    assert (charades.task, charades.model.num_frames, charades.data.text_max_length, charades.data.num_classes) == (
        "charades",
        32,
        15,
        157,
    )
    assert (charades.optim.lr, charades.objective.temperature, charades.schedule.epochs) == (1.5e-5, 0.05, 20)
    tiny = TrainConfig.load("finetune_epic_mir_tiny.json")
    assert (tiny.task, tiny.model.num_frames, tiny.model.preset) == ("epic_mir", 16, "tiny")
    assert TrainConfig().task == "pretrain"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"task": "vqa"}, r"task must be one of \['pretrain', 'epic_mir', 'charades'\]"),
        ({"task": "epic_mir", "data": {"annotations": "epic"}}, "set model.init_from"),
        ({"task": "charades", "model": {"init_from": "x.pth"}}, "data.annotations"),
        (
            {"task": "epic_mir", "model": {"init_from": "x.pth", "text_warmup_steps": 5}, "data": {"annotations": "e"}},
            "text_warmup_steps is for pre-training only",
        ),
        ({"objective": {"margin": -0.1}}, r"objective.margin must be >= 0"),
        ({"data": {"num_classes": 0}}, r"data.num_classes must be > 0"),
        ({"data": {"annotations": ""}}, r"data.annotations must be a non-empty string"),
    ],
)
def test_finetune_config_rules(change, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(change)


# -- runs --------------------------------------------------------------------------------------------------------
def test_epic_mir_finetuning_runs_and_evaluates_each_epoch(data, checkpoint, demo_tokenizer_dir, tmp_path):
    summary = train(
        TrainConfig.from_dict(_config("epic_mir", data, checkpoint, demo_tokenizer_dir)),
        tmp_path / "run",
        progress=False,
    )
    assert summary["task"] == "epic_mir" and summary["steps"] == 4  # 8 clips / 4 per step x 2 epochs
    assert set(summary["epic_mir"]) == METRICS and "egomcq" not in summary
    records = _records(tmp_path / "run")
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["loss"] >= 0 and math.isfinite(r["grad_norm"]) for r in losses)
    evals = [r for r in records if "epic_mir" in r]
    assert [r["step"] for r in evals] == [2, 4]  # after epoch 1 and at the end
    assert all(0 < v <= 100 for r in evals for v in r["epic_mir"].values())
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert saved["video_model.temporal_embed"].shape[1] == 8  # trained at 8 frames from a 4-frame checkpoint


def test_charades_finetuning_runs_and_reports_map(data, checkpoint, demo_tokenizer_dir, tmp_path, capsys):
    path = tmp_path / "charades.json"
    path.write_text(json.dumps(_config("charades", data, checkpoint, demo_tokenizer_dir, epochs=1)))
    assert (
        train_module.main(
            ["--config", str(path), "--output", str(tmp_path / "run"), "--no-progress", "--device", "cpu"]
        )
        == 0
    )
    assert "charades    mAP" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["task"] == "charades" and summary["steps"] == 2  # 8 actions / 4 per step
    assert set(summary["charades"]) == {"mAP"} and 0 < summary["charades"]["mAP"] <= 100
    assert all(math.isfinite(r["loss"]) for r in _records(tmp_path / "run") if "loss" in r)


def test_finetuning_resume_after_sigkill_is_bitwise_exact(data, checkpoint, demo_tokenizer_dir, tmp_path):
    """SIGKILL right after checkpoint 3 (mid-epoch 2, after epoch 1's evaluation), then --resume: the same weights,
    losses and evaluation as a run that was never killed."""
    config = _config("epic_mir", data, checkpoint, demo_tokenizer_dir, epochs=3)
    run_train(config, tmp_path / "straight")
    kill_after_checkpoint(config, tmp_path / "killed", 3)
    assert not (tmp_path / "killed" / "checkpoints" / "step_00000006").exists(), "killed too late to test resume"
    run_train(config, tmp_path / "killed", "--resume")

    a, b = weights(tmp_path / "straight", 6), weights(tmp_path / "killed", 6)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 7)) and straight[6]["loss"] == resumed[6]["loss"]
    assert _records(tmp_path / "straight")[-1]["epic_mir"] == _records(tmp_path / "killed")[-1]["epic_mir"]


def test_two_processes_fine_tune_as_one(data, checkpoint, demo_tokenizer_dir, tmp_path):
    """torchrun with 2 processes x 2 clips per step = 1 process x 4: the same losses, the same first gradient norm
    to round-off, the same weights but a few elements (tests/trainer/test_train.py says why not all), and the
    evaluation sharded and gathered to the same numbers. The EK-100 loss reads the relevancy rows of the whole global
    batch, so a rank that used only its own rows would move the loss by percent.

    Only the first gradient norm is pure round-off (it agrees to 2e-7 relative here). Fine-tuning gradients are small
    (norm 0.01), so many of their elements sit near AdamW's eps, where the first update turns round-off into weight
    differences (after step 1: 1620 of 785k weights, at most 1.7e-4 apart); step 2's gradient norm then differs by
    about 2e-5 relative, and is held to 1e-4. After step 2, 0.012% of the weights are more than 1e-5 apart (Charades'
    loss: 0.002%), at most 6 elements of a 128-element bias: each tensor may hold 1% or 8 such elements,
    where a tensor left out of the gradient all-reduce moves every element that got a gradient."""
    task = "epic_mir"  # the loss that also gathers the relevancy rows; Charades' shares the embedding gathers
    config = _config(task, data, checkpoint, demo_tokenizer_dir, epochs=1)
    config["model"]["text_dropout"] = 0.0  # dropout masks come from per-process RNG streams
    run_train(config, tmp_path / "one")
    run_train(config, tmp_path / "two", launcher=TORCHRUN_TWO + ["--master-port", "29527"])
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2]
    for step in one:
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], abs=1e-5), step
        rel = 1e-5 if step == 1 else 1e-4
        assert two[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=rel), step
    a, b = weights(tmp_path / "one", 2), weights(tmp_path / "two", 2)
    apart = {key: int(((a[key] - b[key]).abs() > 1e-5).sum()) for key in a}
    assert sum(apart.values()) <= 1e-3 * sum(t.numel() for t in a.values())
    for key, count in apart.items():
        assert count <= max(0.01 * a[key].numel(), 8), (key, count)
    result_one, result_two = _records(tmp_path / "one")[-1][task], _records(tmp_path / "two")[-1][task]
    assert result_two == pytest.approx(result_one, abs=1e-3)


# -- bad input ---------------------------------------------------------------------------------------------------
def _broken_copy(data, tmp_path, task, edit):
    """A copy of the synthetic annotations of `task` (videos linked, not copied) with one file edited."""
    import shutil

    root = tmp_path / "ds"
    root.mkdir()
    for entry in data.iterdir():
        if entry.name in ("epic", "charades"):
            shutil.copytree(entry, root / entry.name, symlinks=True)
        else:
            (root / entry.name).symlink_to(entry.resolve())
    edit(root / ("epic" if task == "epic_mir" else "charades"))
    return root


def _edit_csv_row(path, column, value, row=0):
    import csv

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows[row + 1][column] = value
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


@pytest.mark.parametrize(
    "task, edit, names",
    [
        (
            "epic_mir",
            lambda d: _edit_csv_row(d / "EPIC_100_retrieval_train.csv", 2, "no_such_video"),
            "EPIC_100_retrieval_train.csv",
        ),
        (
            "epic_mir",
            lambda d: np.save(
                d / "relevancy" / "caption_relevancy_EPIC_100_retrieval_train.npy", np.zeros((3, 2), np.float32)
            ),
            "relevancy",
        ),
        (
            "charades",
            lambda d: _edit_csv_row(d / "CharadesEgo_v1_test_only1st.csv", 9, "c999 0.00 1.00"),
            "CharadesEgo_v1_test_only1st.csv",
        ),
    ],
)
def test_bad_annotations_are_one_line_errors_naming_the_file(
    data, checkpoint, demo_tokenizer_dir, tmp_path, capsys, task, edit, names
):
    root = _broken_copy(data, tmp_path, task, edit)
    config = _config(task, root, checkpoint, demo_tokenizer_dir, epochs=1)
    config["data"]["strict"] = True
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    from egovlp_deploy.cli import main as cli_main

    code = cli_main(
        ["train", "--config", str(path), "--output", str(tmp_path / "run"), "--no-progress", "--device", "cpu"]
    )
    err = capsys.readouterr().err
    assert code == 2 and names in err and "Traceback" not in err, err  # strict: the file (and row) named, no run


def test_lax_loading_skips_and_counts_a_bad_row(data, checkpoint, demo_tokenizer_dir, tmp_path, capsys):
    root = _broken_copy(
        data, tmp_path, "epic_mir", lambda d: _edit_csv_row(d / "EPIC_100_retrieval_train.csv", 2, "no_such_video")
    )
    config = _config("epic_mir", root, checkpoint, demo_tokenizer_dir, epochs=1)
    config["data"]["strict"] = False
    summary = train(TrainConfig.from_dict(config), tmp_path / "run", progress=False)
    assert summary["steps"] == 1  # 7 readable clips of 8: one full batch of 4 per epoch
    assert "(1 bad rows skipped)" in capsys.readouterr().out
