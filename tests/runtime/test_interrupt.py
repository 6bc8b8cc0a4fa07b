"""Ctrl-C or SIGTERM during `index`: a one-line message, exit 130 / 143, the committed windows kept, and the same
command then finishes the index."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_index_says_how_to_resume(engines, video_root, tmp_path, sig, code):
    videos = [str(video_root / u / "0.mp4") for u in ("vid_a", "vid_b", "vid_c")]
    cmd = [
        str(BIN / "egovlp-deploy"),
        "index",
        *videos,
        "--engines",
        str(engines),
        "--out",
        str(tmp_path / "idx"),
        "--commit-every",
        "1",
        "--batch",
        "1",
        "--window",
        "0.5",
        "--stride",
        "0.25",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    index = tmp_path / "idx" / "index.json"
    deadline = time.time() + 240
    while not index.is_file():  # the first commit
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the index finished before the signal arrived")
    assert proc.returncode == code, err[-2000:]
    assert "interrupted; finished work is kept, rerun the same command to continue" in err
    assert "Traceback" not in err
    partial = json.loads(index.read_text())
    done = sum(v["done"] for v in partial["videos"])
    total = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=300)
    assert total.returncode == 0, total.stderr[-2000:]
    summary = json.loads(total.stdout)
    assert summary["new_windows"] == summary["windows"] - done and summary["videos"] == 3
