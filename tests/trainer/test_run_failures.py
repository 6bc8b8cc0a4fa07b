"""Failures at the start of a run: `--resume` without a checkpoint is one line and exit 1 before any work, a new run
into another run's directory or on a device that is not there is one line and exit 2 before any work, and the temp
directories of killed checkpoint saves are removed at the next start (only those)."""

import json
import os

import pytest

from egovlp_deploy import EgoVLPv2, EgoVLPv2Config
from egovlp_deploy.checkpoint import list_checkpoints
from egovlp_deploy.cli import main
from egovlp_deploy.trainer import training_state
from egovlp_deploy.trainer.config import TrainConfig
from egovlp_deploy.trainer.train import TrainingError, check_output_dir, train
from egovlp_deploy.trainer.training_state import remove_stale_temp_dirs, save_checkpoint


def test_resume_without_a_checkpoint_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EGOVLP_DEBUG", raising=False)
    (tmp_path / "c.json").write_text(json.dumps({"data": {"root": str(tmp_path / "no_data")}}))
    code = main(
        ["train", "--config", str(tmp_path / "c.json"), "--output", str(tmp_path / "run"), "--resume", "--no-progress"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    checkpoints = tmp_path / "run" / "checkpoints"
    assert err == [f"egovlp-deploy train: error: --resume: no valid checkpoint under {checkpoints}"]
    assert not (tmp_path / "run").exists()  # checked before any work (no tokenizer, model or data built)


def test_egovlp_debug_adds_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EGOVLP_DEBUG", "1")
    (tmp_path / "c.json").write_text("{}")
    assert main(["train", "--config", str(tmp_path / "c.json"), "--output", str(tmp_path / "run"), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith(f"no valid checkpoint under {tmp_path / 'run' / 'checkpoints'}")


def killed_save(directory, step: int) -> None:
    """A save killed (os._exit, as by SIGKILL) after it wrote the model: it leaves its temp directory behind."""
    model = EgoVLPv2(EgoVLPv2Config.tiny())
    pid = os.fork()
    if pid == 0:
        try:
            training_state.save_safetensors = lambda *args, **kwargs: os._exit(9)
            save_checkpoint(directory, step, model, {"step": step}, {})
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9


def test_the_next_start_removes_only_killed_saves_temp_directories(tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints"
    killed_save(ckpt, 4)
    (leftover,) = [p for p in ckpt.iterdir()]
    assert leftover.name.startswith(".step_00000004.") and (leftover / "model.safetensors").is_file()
    keep = [ckpt / ".step_notes", ckpt / "step_00000002", ckpt / "other", ckpt / ".step_00000005.abc"]
    for path in keep:
        path.mkdir()
    (ckpt / ".step_00000006.abcdefgh").write_text("a file, not a save's directory")
    keep.append(ckpt / ".step_00000006.abcdefgh")
    (ckpt / ".step_00000007.linkdirx").symlink_to(tmp_path)
    keep.append(ckpt / ".step_00000007.linkdirx")

    with pytest.raises(TrainingError, match="no valid checkpoint"):  # the resume check comes after the cleanup
        with pytest.warns(UserWarning, match="did not finish"):  # the manifest-less step_00000002
            train(TrainConfig(), tmp_path / "run", resume=True, device="cpu", progress=False)
    assert not leftover.exists()
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(p.name for p in keep)
    assert f"removed {leftover}" in capsys.readouterr().err
    assert remove_stale_temp_dirs(ckpt) == [] and remove_stale_temp_dirs(tmp_path / "missing") == []
    assert [p.name for p in list_checkpoints(ckpt)] == ["step_00000002"]


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(
    "leftover", ["checkpoints/step_00000310/MANIFEST.json", "metrics.jsonl", "summary.json", "tokenizer/tokenizer.json"]
)
def test_a_new_run_into_another_runs_directory_is_refused_before_any_work(tmp_path, capsys, monkeypatch, leftover):
    """Without --resume the old run's checkpoints (later steps) would prune the new run's and the logs would mix."""
    monkeypatch.delenv("EGOVLP_DEBUG", raising=False)
    (tmp_path / "c.json").write_text(json.dumps({"data": {"root": str(tmp_path / "no_data")}}))
    run = tmp_path / "run"
    (run / leftover).parent.mkdir(parents=True, exist_ok=True)
    (run / leftover).write_text("{}")
    (run / "checkpoints" / ".step_00000002.abcdefgh").mkdir(parents=True)  # a killed save's temp directory
    before = _tree(run)
    code = main(["train", "--config", str(tmp_path / "c.json"), "--output", str(run), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"egovlp-deploy train: error: --output {run} already holds a training run (")
    assert err[0].endswith("add --resume to continue it, or give a new or empty directory")
    assert _tree(run) == before  # nothing written or removed


def test_a_new_empty_or_unrelated_directory_takes_a_new_run(tmp_path):
    check_output_dir(tmp_path / "new", resume=False)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # empty: no run saved anything there
    (tmp_path / "run" / "notes.txt").write_text("mine")
    check_output_dir(tmp_path / "run", resume=False)
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 0, "epoch": 0, "data": {"clips": 24}}\n')
    assert check_output_dir(tmp_path / "run", resume=False)  # a run that trained no step: taken over
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 0, "epoch": 0, "data": {}}\n{"step": 1, "lo')
    assert check_output_dir(tmp_path / "run", resume=False)  # a row a kill cut: still no step trained
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 0, "epoch": 0, "data": {}}\n{"step": 1, "loss": 3.0}\n')
    with pytest.raises(ValueError, match="already holds a training run"):
        check_output_dir(tmp_path / "run", resume=False)
    (tmp_path / "run" / "metrics.jsonl").write_text("my notes\nnot json\n")  # someone else's file of that name
    with pytest.raises(ValueError, match="already holds a training run"):
        check_output_dir(tmp_path / "run", resume=False)
    check_output_dir(tmp_path / "run", resume=True)  # --resume continues it
    with pytest.raises(ValueError, match="is a file, not a directory"):
        check_output_dir(tmp_path / "run" / "notes.txt", resume=False)


@pytest.mark.parametrize(
    "device, message",
    [
        ("tpu", "--device 'tpu': expected auto, cpu, cuda or cuda:N"),
        ("cuda", "--device cuda: CUDA is not available"),
        ("cuda:7", "--device cuda:7: CUDA is not available"),
    ],
)
def test_a_device_that_is_not_there_is_one_line_and_exit_2_before_any_work(
    tmp_path, capsys, monkeypatch, device, message
):
    monkeypatch.delenv("EGOVLP_DEBUG", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # a CPU-only machine, also where GPUs are
    (tmp_path / "c.json").write_text(json.dumps({"data": {"root": str(tmp_path / "no_data")}}))
    argv = ["train", "--config", str(tmp_path / "c.json"), "--output", str(tmp_path / "run"), "--device", device]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"egovlp-deploy train: error: {message}")
    assert not (tmp_path / "run").exists()
