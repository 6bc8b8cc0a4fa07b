"""A multi-process run when one process goes wrong (red-team findings), with two CPU processes (gloo) started by
hand as srun or mpirun start them: a process that fails is named with its error by the others, a process that
hangs stops the others after the collectives' timeout, processes that disagree on their config or data are refused
before any training, and a step that is not finite on one process is skipped by all."""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from egovlp_deploy.trainer import distributed as D
from training_cli import small_run_config, tiny_synth_data, two_ranks

BIN = Path(sys.executable).parent

# `egovlp-deploy` with a fault injected on rank 1 first: PRELUDE, run in rank 1 only, patches the trainer's code.
FAULTY_RANK_1 = """
import os, sys
if os.environ["RANK"] == "1":
    exec(os.environ["PRELUDE"])
from egovlp_deploy.cli import main
sys.exit(main(sys.argv[1:]))
"""

BAD_CLIP = """
from egovlp_deploy.data import egoclip
from egovlp_deploy.data.errors import DataError
read, calls = egoclip.EgoClipDataset.__getitem__, [0]
def getitem(self, i):  # rank 1 reads 2 clips per step: the 5th is in step 3
    calls[0] += 1
    if calls[0] == 5:
        raise DataError("videos/bad.mp4: cannot decode (only rank 1 reads it)")
    return read(self, i)
egoclip.EgoClipDataset.__getitem__ = getitem
"""

INFINITE_LOSS_ONCE = """
from egovlp_deploy.trainer import objectives
forward, done = objectives.PretrainObjective.forward, []
def infinite_once(self, batch, step):  # the loss, not its gradient: rank 1's gradients stay finite
    loss, parts = forward(self, batch, step)
    if step == 1 and not done:
        done.append(1)
        loss = loss + float("inf")
    return loss, parts
objectives.PretrainObjective.forward = infinite_once
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_synth_data(tmp_path_factory.mktemp("synth") / "data", seed=5)


def _config(data) -> dict:
    """8 clips / 4 per step: 2 steps per epoch, 2 epochs, a checkpoint every step."""
    return small_run_config(data, schedule={"batch_size": 4}, eval={"every_epochs": 2})


def _launch(tmp_path, config: dict, prelude: str = "", config_1: dict | None = None, **env):
    """Train `config` into tmp_path/run as ranks 0 and 1 (rank 1 with `config_1` where given, and `prelude`
    run first): their exit codes and stderr."""
    paths = []
    for rank, cfg in enumerate([config, config_1 or config]):
        paths.append(tmp_path / f"config{rank}.json")
        paths[-1].write_text(json.dumps(cfg))
    run = tmp_path / "run"
    os.environ.update(PRELUDE=prelude, **env)  # two_ranks passes this process's environment on
    try:
        if config_1 is None:
            cmd = [sys.executable, "-c", FAULTY_RANK_1, "train", "--config", str(paths[0])]
            return two_ranks([*cmd, "--output", str(run), "--no-progress", "--device", "cpu"])
        # each rank its own config file: a shell picks it by $RANK
        script = f"exec {BIN / 'egovlp-deploy'} train --config {tmp_path}/config$RANK.json --output {run} --no-progress"
        return two_ranks(["bash", "-c", script + " --device cpu"])
    finally:
        for key in ["PRELUDE", *env]:
            os.environ.pop(key, None)


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def test_a_failing_rank_is_named_with_its_error_by_the_others(data, tmp_path):
    """Rank 1 cannot decode a clip that only it reads: rank 0's next collective fails. Rank 0 said only that gloo's
    connection was closed, in a traceback; it names rank 1 and its error in one line, and the kept checkpoints."""
    codes, errors = _launch(tmp_path, _config(data), BAD_CLIP)
    assert codes == [1, 2], errors
    rank0 = _last_line(errors[0])
    assert rank0.startswith("egovlp-deploy train: error: rank 0 of 2: a collective with the other processes failed")
    assert "rank 1 stopped with DataError: videos/bad.mp4: cannot decode (only rank 1 reads it)" in rank0
    assert "the checkpoints up to step_00000002 are kept" in rank0
    assert "Traceback" not in errors[0]
    assert _last_line(errors[1]).startswith("egovlp-deploy train: error: videos/bad.mp4: cannot decode")
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000001", "step_00000002"]  # no save of step 3, whole or half-written


def test_processes_that_disagree_on_settings_or_data_are_refused_before_training(data, tmp_path):
    """Each process reads its own config and data. Rank 1 with another learning rate trained a silently different
    model (DDP averages the gradients, each process steps with its own rate); with more clips its epochs had more
    steps and the processes met in mismatched collectives (gloo aborted rank 0). Both are refused up front, on every
    process; paths (other mount points on other machines) may differ."""
    other = tmp_path / "copy"
    tiny_synth_data(other, seed=5, train_videos=3)  # 12 training clips, not 8
    config_1 = _config(other)
    config_1["optim"] = config_1["optim"] | {"lr": 5e-2}
    codes, errors = _launch(tmp_path, _config(data), config_1=config_1)
    assert codes == [2, 2], errors
    for stderr in errors:
        line = _last_line(stderr)
        assert line.startswith("egovlp-deploy train: error: the 2 processes of this launch disagree: "), line
        assert "optim.lr: rank 1 differs from rank 0" in line and "the training data: rank 1 differs" in line
        assert "data.root" not in line
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))


def test_an_evaluation_set_missing_on_one_machine_is_refused_before_training(data, tmp_path):
    """egomcq_json is a path, which may differ per machine, so the check passed a rank whose machine lacked the
    file: it skipped the evaluation the others ran, and gloo aborted rank 0 in the mismatched collective."""
    config_1 = _config(data)
    config_1["data"] = config_1["data"] | {"egomcq_json": "not_copied_here.json"}
    codes, errors = _launch(tmp_path, _config(data), config_1=config_1)
    assert codes == [2, 2], errors
    for stderr in errors:
        assert "the evaluation data: rank 1 differs from rank 0" in _last_line(stderr), stderr[-2000:]


def test_a_step_whose_loss_is_not_finite_on_one_rank_is_skipped_by_every_rank(data, tmp_path):
    """The NaN/inf guard decided on each process's own loss: rank 1 skipped the step, rank 0 took it and saved a
    checkpoint of a step rank 1 never reached, and their next collectives did not match (gloo aborted)."""
    codes, errors = _launch(tmp_path, _config(data), INFINITE_LOSS_ONCE)
    assert codes == [0, 0], errors
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["steps"], summary["skipped_steps"]) == (3, 1)  # 3 steps of the 4 planned: one batch skipped
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 1, "epoch": 0, "skipped_nonfinite": 1} in rows


HANGING_RANK_1 = """
import os, sys, time
from egovlp_deploy.trainer import distributed as D
info = D.setup("cpu")
try:
    if info.rank == 1:
        time.sleep(600)  # stuck (a hung file system, a deadlock): never reaches the barrier
    D.barrier()
except RuntimeError as exc:
    print(D.failure_message(info, exc), file=sys.stderr)
    sys.exit(1)
"""


def test_a_hung_rank_stops_the_others_after_the_configured_timeout(tmp_path):
    """Rank 0 waited for a hung rank for torch's default timeout, 30 minutes on gloo, with no way to change it;
    $EGOVLP_DIST_TIMEOUT_S sets it, and the error says how long it waited and how to change that."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env[D.TIMEOUT_ENV] = "5"
    ranks = [
        subprocess.Popen([sys.executable, "-c", HANGING_RANK_1], env=env | {"RANK": str(r)}, stderr=subprocess.PIPE)
        for r in range(2)
    ]
    try:
        started = time.monotonic()
        _, stderr = ranks[0].communicate(timeout=120)
        waited = time.monotonic() - started
    finally:
        for p in ranks:
            p.kill()
            p.wait()
    assert ranks[0].returncode == 1, stderr
    line = _last_line(stderr.decode())
    assert line.startswith("rank 0 of 2: a collective with the other processes failed (Timed out waiting 5000ms")
    assert line.endswith(
        "another process did not answer within the collectives' timeout, 5 s ($EGOVLP_DIST_TIMEOUT_S sets it)"
    )
    assert waited < 60


@pytest.mark.parametrize("value", ["0", "-5", "ten", "nan", "inf"])
def test_a_bad_timeout_is_refused(monkeypatch, value):
    monkeypatch.setenv(D.TIMEOUT_ENV, value)
    with pytest.raises(ValueError, match=f"^EGOVLP_DIST_TIMEOUT_S='{value}': expected a positive number of seconds$"):
        D.collective_timeout()


def test_the_timeout_defaults_to_torchs(monkeypatch):
    monkeypatch.delenv(D.TIMEOUT_ENV, raising=False)
    assert D.collective_timeout() is None
    monkeypatch.setenv(D.TIMEOUT_ENV, "90.5")
    assert D.collective_timeout() == datetime.timedelta(seconds=90.5)


def test_only_a_collectives_own_failure_is_explained():
    info = D.DistInfo(rank=1, world_size=2)
    assert D.failure_message(info, RuntimeError("CUDA out of memory")) is None
    assert D.failure_message(info, ValueError("gloo")) is None
    closed = RuntimeError("[/src/gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.1]:41. Check it.")
    assert D.failure_message(info, closed) == (
        "rank 1 of 2: a collective with the other processes failed (Connection closed by peer [10.0.0.1]:41): no "
        "other process's error could be read: one was killed (out of memory, a signal), its machine is gone, or "
        "rank 0 stopped (without torchrun its error goes with it: its own output says why)"
    )
    # this process's own error, whose path happens to hold "gloo": not taken for another process's failure
    assert D.failure_message(info, RuntimeError("/mnt/igloo/run/model.safetensors: disk I/O error")) is None
