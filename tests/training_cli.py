"""`egovlp-deploy train` in a subprocess, as a user runs it: a config file, an output folder, optionally under a
launcher (torchrun), optionally killed; and what a run leaves behind (weights, per-step records). Also the small run
the training tests share: its synthetic data and config, trained in this process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

BIN = Path(sys.executable).parent
TORCHRUN_TWO = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--no-python"]


def run_train(config: dict, out: Path, *extra: str, wait: bool = True, launcher: list[str] | None = None):
    """Write `config` beside `out` and train into `out`; with wait=False return the running Popen (stderr piped),
    else the finished CompletedProcess (asserting it succeeded)."""
    path = out.parent / f"{out.name}.json"
    path.write_text(json.dumps(config))
    cmd = (launcher or []) + [str(BIN / "egovlp-deploy"), "train", "--config", str(path), "--output", str(out)]
    cmd += ["--no-progress", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[:6000]
    return done


def kill_after_checkpoint(config: dict, out: Path, step: int, timeout: float = 300) -> None:
    """Train into `out` and SIGKILL the process as soon as checkpoint `step` is complete on disk."""
    victim = run_train(config, out, wait=False)
    target = out / "checkpoints" / f"step_{step:08d}" / "MANIFEST.json"
    deadline = time.time() + timeout
    try:
        while not target.is_file():
            assert victim.poll() is None, victim.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.02)
    finally:  # killed in every case: a failed wait must not leave a training process behind
        victim.send_signal(signal.SIGKILL)
        victim.wait()


def weights(run: Path, step: int) -> dict:
    return load_file(str(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(run) if "loss" in r}


def edit_state(checkpoint: Path, edit) -> None:
    """Change a checkpoint's state.json as `edit` does to its keys (a dict of them, changed in place) and make its
    manifest match: a checkpoint as an older trainer saved it, or one edited by hand."""
    from egovlp_deploy.hashing import sha256_file

    path = checkpoint / "state.json"
    state = json.loads(path.read_text())
    keys = dict(state["__dict__"])
    edit(keys)
    state["__dict__"] = [[k, v] for k, v in keys.items()]
    path.write_text(json.dumps(state))
    manifest = json.loads((checkpoint / "MANIFEST.json").read_text())
    manifest["files"]["state.json"] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    (checkpoint / "MANIFEST.json").write_text(json.dumps(manifest))


def small_run_data(root: Path) -> Path:
    """The small run's synthetic dataset: 24 training clips (4 videos of 6) and 2 held-out videos."""
    from egovlp_deploy.data.synth import generate

    generate(root, seed=1, train_videos=4, eval_videos=2, clips_per_video=6, workers=1)
    return root


def tiny_synth_data(root: Path, seed: int, train_videos: int = 2, eval_videos: int = 2) -> Path:
    """A few short synthetic videos (4 clips each, 15 fps, 32 px: the tiny model's size), the data of the
    fine-tuning and evaluation tests."""
    from egovlp_deploy.data.synth import generate

    generate(root, seed=seed, workers=1, train_videos=train_videos, eval_videos=eval_videos, clips_per_video=4,
             fps=15, clip_seconds=1.6, size=32)  # fmt: skip
    return root


def small_run_config(root, **sections) -> dict:
    """24 clips / 8 per step: 3 steps per epoch, 2 epochs, a checkpoint every step, no warm-up, no DataLoader
    workers; `sections` update the config's sections ({"schedule": {"max_steps": 1}})."""
    config = {
        "model": {"preset": "tiny", "num_frames": 4},
        "data": {"root": str(root), "tokenizer": "demo", "text_max_length": 16, "num_workers": 0},
        "optim": {"lr": 1e-3, "lr_mult_head": 1.0, "lr_mult_cross_modal": 1.0, "warmup_fraction": 0.0},
        "schedule": {"epochs": 2, "batch_size": 8, "precision": "fp32"},
        "checkpoint": {"every_steps": 1, "keep_last": 0},
        "eval": {"every_epochs": 1, "batch_size": 2, "max_questions": 2},
        "log": {"every_steps": 1},
        "seed": 3,
    }
    for section, values in sections.items():
        config[section] = config[section] | values
    return config


def train_here(config: dict, out, resume: bool = False) -> dict:
    """Train `config` into `out` in this process (the trainer's API); its summary."""
    from egovlp_deploy.trainer.config import TrainConfig
    from egovlp_deploy.trainer.train import train

    return train(TrainConfig.from_dict(config), out, resume=resume, progress=False)


def killed_after(finished, tmp_path, step: int) -> Path:
    """A copy of a finished run as a kill right after checkpoint `step` leaves it: no summary, no later checkpoint
    (its later log rows are cut by the resume)."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "summary.json").unlink()
    for checkpoint in (run / "checkpoints").glob("step_*"):
        if int(checkpoint.name.removeprefix("step_")) > step:
            shutil.rmtree(checkpoint)
    return run


def two_ranks(cmd: list[str], timeout: float = 180) -> tuple[list[int], list[str]]:
    """`cmd` run as ranks 0 and 1 of a process group started by hand (RANK, WORLD_SIZE, MASTER_ADDR/PORT, as srun
    or mpirun start them, without torchrun's agent): their exit codes and stderr."""
    with socket.socket() as probe:  # a free port for the process group
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = [
        subprocess.Popen(
            cmd,
            env=dict(os.environ, OMP_NUM_THREADS="1", RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(port)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]  # fmt: skip
    try:
        errors = [p.communicate(timeout=timeout)[1] for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    return [p.returncode for p in ranks], errors
