"""Configs at their edges: micro-batches too small for a contrastive loss, epochs capped below one step, batches that
processes cannot share, `--set` values that look like numbers or are whole sections, and a run that `--resume`
starts over (stopped before its first checkpoint) built as a new run is, pretrained towers and text warm-up
included."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("av")

from egovlp_deploy.config import ConfigError
from egovlp_deploy.data import synth
from egovlp_deploy.trainer import distributed as D
from egovlp_deploy.trainer import train as train_module
from egovlp_deploy.trainer.config import TrainConfig
from egovlp_deploy.trainer.train import apply_overrides, train
from training_cli import weights

FINETUNE = {"model": {"init_from": "x.pth"}, "data": {"annotations": "a"}}


# -- micro-batches and epochs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change",
    [
        # 4 clips in 4 accumulated micro-batches of 1: the margin loss of a 1 x 1 matrix is 0, nothing is learned
        {"task": "epic_mir", **FINETUNE, "schedule": {"batch_size": 4, "grad_accum_steps": 4}},
        {"task": "charades", **FINETUNE, "schedule": {"batch_size": 1}},
        # pre-training without scene negatives: one pair, EgoNCE 0 and no VTM negative to draw
        {"data": {"neg_window": None}, "schedule": {"batch_size": 2, "grad_accum_steps": 2}},
    ],
)
def test_a_micro_batch_of_one_pair_is_refused(change):
    with pytest.raises(ConfigError, match=r"leaves 1 clip per micro-batch.*needs at least 2"):
        TrainConfig.from_dict(change)


@pytest.mark.parametrize(
    "change",
    [
        {"schedule": {"batch_size": 1}},  # the clip and its scene negative
        {"task": "epic_mir", **FINETUNE, "schedule": {"batch_size": 4, "grad_accum_steps": 2}},
    ],
)
def test_micro_batches_of_two_pairs_are_accepted(change):
    TrainConfig.from_dict(change)


def test_max_samples_per_epoch_below_one_step_is_a_config_error():
    """Checked with the config, not reported after the data loaded as '8 clips give no full step' (which blames the
    data)."""
    with pytest.raises(ConfigError, match="max_samples_per_epoch 3 is less than one step of schedule.batch_size 4"):
        TrainConfig.from_dict({"schedule": {"batch_size": 4, "max_samples_per_epoch": 3}})
    TrainConfig.from_dict({"schedule": {"batch_size": 4, "max_samples_per_epoch": 4}})


def test_a_batch_the_processes_cannot_share_is_refused_before_anything_is_written(tmp_path):
    cfg = TrainConfig.from_dict({"schedule": {"batch_size": 4, "grad_accum_steps": 4}})  # micro-batches of 1 clip
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="1 clips per micro-batch cannot be split over 2 processes"):
        train_module._train(cfg, out, False, D.DistInfo(rank=0, world_size=2), False)
    assert not out.exists()


# -- --set --------------------------------------------------------------------------------------------------------
def test_set_keeps_number_like_text_and_updates_a_section_key_by_key():
    base = TrainConfig.from_dict({"schedule": {"batch_size": 8, "precision": "fp32"}}).to_dict()
    data = apply_overrides(
        base,
        [
            "data.video_root=2024",  # a folder named 2024, not the integer 2024
            "model.init_from=1.5",
            'schedule={"epochs": 3}',  # the other schedule keys stay as the config has them
            'data.tokenizer="9"',
            "optim.grad_clip=1",
            "data.root=null",
        ],
    )
    cfg = TrainConfig.from_dict(data)
    assert (cfg.data.video_root, cfg.model.init_from, cfg.data.tokenizer) == ("2024", "1.5", "9")
    assert (cfg.schedule.epochs, cfg.schedule.batch_size, cfg.schedule.precision) == (3, 8, "fp32")
    assert cfg.optim.grad_clip == 1.0 and cfg.data.root is None
    with pytest.raises(ConfigError, match=r"schedule: unknown key\(s\) \['epoch'\]"):
        TrainConfig.from_dict(apply_overrides(TrainConfig().to_dict(), ['schedule={"epoch": 3}']))
    with pytest.raises(ConfigError, match="schedule.epochs must be int"):
        TrainConfig.from_dict(apply_overrides(TrainConfig().to_dict(), ['schedule.epochs="3"']))


# -- --resume starting a run over ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    synth.generate(
        out, seed=5, workers=1, train_videos=2, eval_videos=2, clips_per_video=4, fps=15, clip_seconds=1.6, size=32
    )
    return out


def _data(root, tokenizer) -> dict:
    """The small synthetic set, read in-process with PyAV, without EgoMCQ evaluation."""
    return {"root": str(root), "tokenizer": str(tokenizer), "egomcq_json": None, "backend": "pyav", "num_workers": 0}


def test_a_run_started_over_by_resume_gets_the_pretrained_towers_and_the_text_warmup(
    small_data, demo_tokenizer_dir, tmp_path, monkeypatch
):
    """`--resume` on a run stopped before its first checkpoint runs it again from step 0: its model must be built as
    the new run's was (towers from model.init_video / init_text, then the SimCSE warm-up), not as a resumed run's,
    whose checkpoint would replace them."""
    towers = []
    real_new_model = train_module.new_model

    def new_model(config, init_video=None, init_text=None):  # records the tower files; the model starts random
        towers.append((init_video, init_text))
        return real_new_model(config, None, None)

    monkeypatch.setattr(train_module, "new_model", new_model)
    config = {
        "model": {"preset": "tiny", "num_frames": 2, "text_warmup_steps": 2, "init_video": "vit.pth"},
        "data": _data(small_data, demo_tokenizer_dir),
        "optim": {"lr": 1e-3},
        "schedule": {"epochs": 1, "batch_size": 4, "max_steps": 1, "precision": "fp32"},
        "log": {"every_steps": 1},
        "seed": 1,
    }
    cfg = TrainConfig.from_dict(config)
    straight, restarted = tmp_path / "straight", tmp_path / "restarted"
    train(cfg, straight, progress=False)
    restarted.mkdir()
    lines = (straight / "metrics.jsonl").read_text().splitlines(keepends=True)
    (restarted / "metrics.jsonl").write_text(lines[0] + '{"step": 1, "lo')  # killed before its first checkpoint
    train(cfg, restarted, resume=True, progress=False)
    assert towers == [("vit.pth", None), ("vit.pth", None)]
    a, b = weights(straight, 1), weights(restarted, 1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (restarted / "metrics.jsonl").read_text().splitlines()[0] == lines[0].rstrip("\n")

    # a resumed run proper is built from its checkpoint: no new model, no towers read, no warm-up
    towers.clear()
    monkeypatch.setattr(train_module, "simcse_warmup", lambda *a, **k: pytest.fail("warm-up on resume"))
    summary = train(cfg, straight, resume=True, progress=False)
    assert towers == [] and summary["steps"] == 1
    assert json.loads((straight / "summary.json").read_text())["steps"] == 1


def test_a_step_logs_its_losses_over_all_its_micro_batches(small_data, demo_tokenizer_dir, tmp_path, monkeypatch):
    """With grad_accum_steps 2 a step's gradient is the mean over its 2 micro-batches; its logged loss terms are
    the same mean, not the last micro-batch's."""
    seen = []

    class Recorded(train_module.PretrainObjective):
        def forward(self, batch, step):
            loss, parts = super().forward(batch, step)
            seen.append({k: float(v) for k, v in parts.items()})
            return loss, parts

    monkeypatch.setattr(train_module, "PretrainObjective", Recorded)
    config = {
        "model": {"preset": "tiny", "num_frames": 2},
        "data": _data(small_data, demo_tokenizer_dir),
        "schedule": {"epochs": 1, "batch_size": 4, "grad_accum_steps": 2, "max_steps": 1, "precision": "fp32"},
        "log": {"every_steps": 1},
    }
    train(TrainConfig.from_dict(config), tmp_path / "run", progress=False)
    (record,) = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open()) if "loss" in r]
    assert len(seen) == 2 and seen[0]["loss"] != seen[1]["loss"]
    for key in ("loss", "egonce", "mlm", "vtm", "vtm_accuracy"):
        assert record[key] == pytest.approx((seen[0][key] + seen[1][key]) / 2, rel=1e-6), key


def test_an_egomcq_file_that_is_not_there_is_reported(small_data, demo_tokenizer_dir, tmp_path, capsys):
    """data.egomcq_json names a missing file (a typo, or a dataset without one): the run trains without evaluation,
    and says so instead of leaving its summary's EgoMCQ empty unexplained."""
    config = {
        "model": {"preset": "tiny", "num_frames": 2},
        "data": {
            "root": str(small_data),
            "tokenizer": str(demo_tokenizer_dir),
            "egomcq_json": "egomcq_typo.json",
            "backend": "pyav",
            "num_workers": 0,
        },
        "schedule": {"epochs": 1, "batch_size": 4, "max_steps": 1, "precision": "fp32"},
    }
    summary = train(TrainConfig.from_dict(config), tmp_path / "run", progress=False)
    assert summary["egomcq"] is None
    assert f"note: data.egomcq_json {small_data / 'egomcq_typo.json'} is not there" in capsys.readouterr().err
