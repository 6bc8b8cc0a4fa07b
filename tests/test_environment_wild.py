"""The commands on odd machines: unwritable compile caches, JSON files that are FIFOs, devices or huge, symlink
loops given to `info`. Each case ends in a result or a one-line error, never a hang or a bare traceback."""

import json
import os
import subprocess
import sys
import threading

import pytest

from egovlp_deploy import cache_dirs, jsonfile
from egovlp_deploy.artifact_info import describe
from egovlp_deploy.benchmarking import ResultsFolder
from egovlp_deploy.demo import check_replaceable
from egovlp_deploy.jsonfile import read_json


class MyError(ValueError):
    pass


def _within(fn, seconds=10.0, fifo=None):
    """(finished, outcome) of fn() run in a thread for at most `seconds`: outcome is its value or its exception.
    A call still blocked on `fifo` is released (a writer opens and closes it) so the test fails instead of
    hanging."""
    box = {}

    def target():
        try:
            box["outcome"] = fn()
        except BaseException as exc:  # handed to the test
            box["outcome"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    finished = not thread.is_alive()
    if not finished and fifo is not None:
        os.close(os.open(fifo, os.O_WRONLY))  # EOF for the blocked reader
        thread.join(seconds)
    return finished, box.get("outcome")


# -- compile caches ---------------------------------------------------------------------------------------------
def test_an_unwritable_inductor_cache_is_replaced_for_the_run_with_a_note(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    env = {"TORCHINDUCTOR_CACHE_DIR": str(blocker / "cache")}  # under a file: no one can create it, root neither
    notes = []
    changed = cache_dirs.usable_cache_dirs(env, notes.append)
    assert (
        list(changed) == ["TORCHINDUCTOR_CACHE_DIR"]
        and env["TORCHINDUCTOR_CACHE_DIR"] == changed["TORCHINDUCTOR_CACHE_DIR"]
    )
    assert os.path.isdir(env["TORCHINDUCTOR_CACHE_DIR"]) and os.access(env["TORCHINDUCTOR_CACHE_DIR"], os.W_OK)
    assert len(notes) == 1 and f"TORCHINDUCTOR_CACHE_DIR={blocker / 'cache'} cannot be written" in notes[0]


def test_writable_caches_are_kept_and_an_unset_triton_cache_is_not_created(tmp_path):
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "TRITON_HOME": str(tmp_path / "home")}
    notes = []
    assert cache_dirs.usable_cache_dirs(env, notes.append) == {} and notes == []
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    assert "TRITON_CACHE_DIR" not in env and not (tmp_path / "home").exists()
    assert not (tmp_path / "inductor").exists()  # a command that never compiles leaves no cache folder behind


def test_a_triton_home_that_cannot_hold_its_cache_gets_a_temporary_one_quietly(tmp_path):
    home = tmp_path / "home_is_a_file"
    home.write_text("x")
    env = {"TRITON_HOME": str(home)}
    notes = []
    changed = cache_dirs.usable_cache_dirs(env, notes.append)
    assert list(changed) == ["TRITON_CACHE_DIR"] and os.path.isdir(env["TRITON_CACHE_DIR"]) and notes == []


def test_info_runs_with_an_unwritable_inductor_cache(tmp_path):
    """Importing torch._dynamo (the meta-device count does) creates TORCHINDUCTOR_CACHE_DIR: unwritable, it failed
    `info` (and train, export, demo) with a bare Permission denied."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(blocker / "cache")}
    run = subprocess.run(
        [sys.executable, "-m", "egovlp_deploy.cli", "info", "--model", "tiny", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["model"]["config"] == "tiny"
    assert "TORCHINDUCTOR_CACHE_DIR=" in run.stderr and "cannot be written" in run.stderr


# -- JSON files that are not files -------------------------------------------------------------------------------
def test_a_fifo_in_a_json_files_place_is_refused_at_once(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    finished, outcome = _within(lambda: read_json(fifo, MyError), fifo=fifo)
    assert finished, "read_json blocked on a FIFO"
    assert isinstance(outcome, MyError) and "not a regular file" in str(outcome)


def test_a_device_in_a_json_files_place_is_refused_unread(tmp_path):
    link = tmp_path / "index.json"
    link.symlink_to("/dev/zero")  # read to the end, it would fill the memory
    with pytest.raises(MyError, match="not a regular file"):
        read_json(link, MyError)


def test_a_huge_json_file_is_refused_before_it_is_read(tmp_path):
    huge = tmp_path / "manifest.json"
    with open(huge, "wb") as f:
        f.truncate(jsonfile.MAX_JSON_BYTES + 1)  # sparse: no disk used
    with pytest.raises(MyError, match="too large"):
        read_json(huge, MyError)


def test_demo_force_on_a_folder_whose_marker_is_a_fifo_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "demo.json")
    finished, outcome = _within(lambda: check_replaceable(tmp_path), fifo=tmp_path / "demo.json")
    assert finished, "demo --force blocked reading a FIFO marker"
    assert isinstance(outcome, ValueError) and "not a folder written by egovlp-deploy demo" in str(outcome)


def test_bench_out_holding_a_fifo_of_its_results_name_is_refused_without_hanging(tmp_path):
    os.mkfifo(tmp_path / "e2e.json")

    def enter():
        with ResultsFolder(tmp_path, "e2e", ("e2e.json", "e2e.md", "e2e.png")):
            return "entered"

    finished, outcome = _within(enter, fifo=tmp_path / "e2e.json")
    assert finished, "bench blocked reading a FIFO in its --out"
    assert isinstance(outcome, ValueError) and "e2e.json already there and not written by" in str(outcome)


# -- info on links that lead nowhere -----------------------------------------------------------------------------
def test_info_names_a_symlink_loop_and_a_dangling_link(tmp_path):
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(ValueError, match="a: a symlink to b, which does not exist \\(or is a symlink loop\\)"):
        describe(tmp_path / "a")
    (tmp_path / "gone").symlink_to(tmp_path / "missing_run")
    with pytest.raises(ValueError, match="missing_run, which does not exist"):
        describe(tmp_path / "gone")


# -- bench e2e's cached export ----------------------------------------------------------------------------------
def test_e2e_exports_again_when_its_cached_engines_lack_a_precision_asked_for(tmp_path, monkeypatch):
    """The engines cached in OUT by an fp32 run made every int8 row of a later `--precisions fp32,int8` run
    'unavailable' (the manifest lists no int8 artifact) instead of timing int8."""
    import egovlp_deploy.export.runner as runner
    from egovlp_deploy import bench_e2e

    exports = []

    def fake_export(source, folder, opts, quiet=False):
        exports.append(opts.precisions)
        folder.mkdir(parents=True, exist_ok=True)
        artifacts = [{"format": "onnx", "precision": p, "role": "video_encoder"} for p in opts.precisions]
        (folder / "manifest.json").write_text(json.dumps({"artifacts": artifacts}))

        class Result:
            passed, errors = True, []

        return Result()

    monkeypatch.setattr(runner, "run_export", fake_export)
    d = bench_e2e._engines(tmp_path, "tiny", 4, 8, precisions=("fp32",))
    assert bench_e2e._engines(tmp_path, "tiny", 4, 8, precisions=("fp32",)) == d  # reused
    assert bench_e2e._engines(tmp_path, "tiny", 4, 8, precisions=("fp32", "int8")) == d
    assert bench_e2e._engines(tmp_path, "tiny", 4, 8, precisions=("int8",)) == d  # reused: it holds int8 now
    assert exports == [("fp32",), ("fp32", "int8")]


def test_a_leased_json_file_is_read_once_its_lease_is_released(tmp_path):
    """A file under a write lease (what a Samba oplock or an NFS delegation puts on a file of a share served from
    this host) makes a non-blocking open fail at once; read_json waits for the lease as a plain reader does."""
    import fcntl
    import signal

    path = tmp_path / "config.json"
    path.write_text('{"a": 1}')
    fd = os.open(path, os.O_RDWR)
    previous = signal.getsignal(signal.SIGIO)
    # the holder is told by SIGIO that a reader waits, and lets go
    signal.signal(signal.SIGIO, lambda *_: fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK))
    try:
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        except OSError as exc:
            pytest.skip(f"this filesystem takes no leases ({exc})")
        script = "import sys; from egovlp_deploy.jsonfile import read_json; print(read_json(sys.argv[1]))"
        done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60)
    finally:
        signal.signal(signal.SIGIO, previous)
        os.close(fd)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "{'a': 1}"
