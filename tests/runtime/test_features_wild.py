"""`features` reruns into a folder that holds an earlier output of the same video with other options (another
--format, --mode or --stride), and a run killed while it replaces one: a video is "done" only where every file its
record vouches for is of this run's options, and an earlier output's files that the new one does not replace are
removed (its own files, as its record lists them; never a file the tool did not write)."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from egovlp_deploy.runtime.engines import Runtime
from egovlp_deploy.runtime.features import extract_features
from video_files import write_video

QUERIES = ["C opens the box"]


class Killed(Exception):
    """Stands in for a kill between writing an output's tensors and its sidecar."""


def _run(engines, video, out, **kw):
    kw = {"frames": 8, "stride": 8, **kw}
    return extract_features([str(video)], Runtime(engines, warmup=False), out, progress=False, **kw)


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def video(tmp_path):
    return write_video(tmp_path / "v" / "take.mp4", 40)  # 5 windows of 8 frames, 9 with stride 4


def test_another_format_is_not_done(engines, video, tmp_path):
    """safetensors stride 8, then npy stride 4, then safetensors stride 4: the last run writes 9 windows, not the
    first run's 5-window file beside a sidecar that describes the second."""
    out = tmp_path / "feats"
    _run(engines, video, out)
    _run(engines, video, out, stride=4, fmt="npy")
    assert _names(out) == ["take.features.npy", "take.json", "take.timestamps.npy"]
    again = _run(engines, video, out, stride=4)
    assert again["written"] == 1 and again["skipped"] == 0
    assert load_file(str(out / "take.safetensors"))["features"].shape[0] == 9
    assert _names(out) == ["take.json", "take.safetensors"]
    assert json.loads((out / "take.json").read_text())["format"] == "safetensors"
    assert _run(engines, video, out, stride=4)["skipped"] == 1


def test_a_sidecar_vouches_only_for_its_format(engines, video, tmp_path):
    """A sidecar that does not say its format (as written before it recorded one) lists no files of ours, so its
    safetensors file stays beside the npy output that replaces it: a later safetensors run is still not done."""
    out = tmp_path / "feats"
    _run(engines, video, out)
    meta = json.loads((out / "take.json").read_text())
    del meta["format"]
    (out / "take.json").write_text(json.dumps(meta))
    _run(engines, video, out, stride=4, fmt="npy")
    assert (out / "take.safetensors").is_file()
    assert _run(engines, video, out, stride=4)["written"] == 1
    assert load_file(str(out / "take.safetensors"))["features"].shape[0] == 9


def test_another_mode_leaves_no_stale_npy(engines, video, tmp_path):
    out = tmp_path / "feats"
    _run(engines, video, out, fmt="npy")
    (out / "take.notes.npy").write_bytes(b"mine")  # the user's file beside ours
    _run(engines, video, out, fmt="npy", mode="fusion", queries=QUERIES)
    keys = ("video_cls", "text_tokens", "text_mask", "timestamps")
    assert _names(out) == sorted(["take.json", "take.notes.npy", *(f"take.{k}.npy" for k in keys)])
    assert (out / "take.notes.npy").read_bytes() == b"mine"
    assert _run(engines, video, out, fmt="npy", mode="fusion", queries=QUERIES)["skipped"] == 1


def test_a_missing_npy_file_is_not_done(engines, video, tmp_path):
    out = tmp_path / "feats"
    _run(engines, video, out, fmt="npy")
    (out / "take.timestamps.npy").unlink()
    assert _run(engines, video, out, fmt="npy")["written"] == 1
    assert (out / "take.timestamps.npy").is_file()


@pytest.mark.parametrize("fmt", ["safetensors", "npy"])
def test_killed_while_replacing_an_output(engines, video, tmp_path, monkeypatch, fmt):
    """A run with stride 4 replaces a stride-8 output and is killed after the tensors, before the sidecar: a rerun
    with stride 8 must not take the stride-4 tensors for its own; both reruns then match uninterrupted runs."""
    from egovlp_deploy import checkpoint

    out, ref = tmp_path / "feats", tmp_path / "ref"
    _run(engines, video, out, fmt=fmt)
    real = checkpoint.atomic_write_bytes

    def killed_at_sidecar(path, data):
        if path.name == "take.json":
            raise Killed(path)
        real(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", killed_at_sidecar)
    with pytest.raises(Killed):
        _run(engines, video, out, fmt=fmt, stride=4)
    monkeypatch.setattr(checkpoint, "atomic_write_bytes", real)
    again = _run(engines, video, out, fmt=fmt)
    assert again["written"] == 1 and again["outputs"][str(video)] == "take"
    _run(engines, video, ref, fmt=fmt)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in ref.iterdir()}
    if fmt == "npy":
        assert np.load(out / "take.features.npy").shape[0] == 5


def test_temp_files_of_a_killed_write_are_removed(engines, video, tmp_path):
    """A kill inside an atomic write leaves its temp file (a large one for fusion tensors) in OUT: the next write of
    that output removes the temp files of its own names, and no other file."""
    out = tmp_path / "feats"
    out.mkdir()
    ours = [".take.safetensors.a1b2c3d4.tmp", ".take.json.zz_9x8y7.tmp", ".take.features.npy.q1w2e3r4.tmp"]
    others = [".take.notes.txt.a1b2c3d4.tmp", ".take.safetensors.tmp", ".other.json.a1b2c3d4.tmp"]
    for name in ours + others:
        (out / name).write_bytes(b"x")
    _run(engines, video, out)
    assert _names(out) == sorted(["take.json", "take.safetensors", *others])


@pytest.mark.parametrize("kind", ["fifo", "nested"])
def test_a_sidecar_or_record_that_is_no_json_file_of_ours_is_not_trusted_and_hangs_nothing(tmp_path, kind):
    """An output folder's sidecar or progress record that is a FIFO (a read would block forever) or JSON nested
    thousands deep (RecursionError, not caught as a bad file): taken for no record, in a bounded time."""
    import os
    import threading

    from egovlp_deploy.runtime.features import PARTIAL, RECORD, _recorded_source, _sidecar

    (tmp_path / PARTIAL / "clip").mkdir(parents=True)
    for path in (tmp_path / "clip.json", tmp_path / PARTIAL / "clip" / RECORD):
        if kind == "fifo":
            os.mkfifo(path)
        else:
            path.write_text("[" * 100_000 + "]" * 100_000)
    box = {}

    def read():
        try:
            box["out"] = (_sidecar(tmp_path, "clip"), _recorded_source(tmp_path, "clip"))
        except BaseException as exc:  # the test reports what escaped
            box["out"] = exc

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # let the blocked reader go before failing
        for path in (tmp_path / "clip.json", tmp_path / PARTIAL / "clip" / RECORD):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    assert not thread.is_alive(), "a reader blocked on a FIFO"
    assert box["out"] == (None, None)
