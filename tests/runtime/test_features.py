"""`features` output identity: one output per source file whatever the folder layout, "already done" only for the
same source with the same settings, and the chosen decoder used for the pixels; a run killed inside a video resumes
there and writes what an uninterrupted run writes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from egovlp_deploy.runtime.clip_pipeline import ClipPipeline, plan_windows
from egovlp_deploy.runtime.engines import Runtime
from egovlp_deploy.runtime.features import extract_features
from video_files import write_video


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """Same stems in different folders, the EgoClip chunk layout and digit-named files."""
    root = tmp_path_factory.mktemp("layout")
    files = [
        root / "a" / "clip.mp4",
        root / "b" / "clip.mp4",
        root / "uid" / "0.mp4",
        root / "uid" / "1.mp4",
        root / "myclips" / "20240101.mp4",
        root / "myclips" / "20240102.mp4",
    ]
    for i, f in enumerate(files):
        write_video(f, 12 + 2 * i)
    return root, files


def _run(engines, files, out, **kw):
    rt = Runtime(engines, warmup=False)
    return extract_features([str(f) for f in files], rt, out, frames=8, stride=8, progress=False, **kw)


def test_every_source_gets_its_own_output(engines, layout, tmp_path):
    _, files = layout
    out = tmp_path / "feats"
    summary = _run(engines, files, out)
    names = summary["outputs"]
    assert summary["written"] == len(files) == len(set(names.values()))
    assert names[str(files[2])] == "uid_0" and names[str(files[3])] == "uid_1"
    assert names[str(files[0])].startswith("clip-") and names[str(files[1])].startswith("clip-")
    for f in files:
        meta = json.loads((out / f"{names[str(f)]}.json").read_text())
        assert meta["source"]["path"] == str(f.resolve())
        frames = 12 + 2 * files.index(f)
        assert load_file(str(out / f"{names[str(f)]}.safetensors"))["features"].shape[0] == -(-frames // 8)
    again = _run(engines, files, out)
    assert again["skipped"] == len(files) and again["written"] == 0 and again["outputs"] == names


def test_a_new_source_never_takes_an_existing_output(engines, layout, tmp_path):
    """Run 1 writes uid/0.mp4 as uid_0; run 2 gets another folder's uid/0.mp4: a new name, run 1's file kept."""
    root, files = layout
    out = tmp_path / "feats"
    first = _run(engines, [files[2]], out)["outputs"][str(files[2])]
    other = tmp_path / "elsewhere" / "uid" / "0.mp4"
    write_video(other, 30)
    before = (out / f"{first}.safetensors").read_bytes()
    second = _run(engines, [other], out)["outputs"][str(other)]
    assert first == "uid_0" and second.startswith("uid_0-")
    assert (out / f"{first}.safetensors").read_bytes() == before
    assert _run(engines, [files[2]], out)["skipped"] == 1  # the first source is still done under its name


def test_a_changed_source_is_not_done(engines, tmp_path):
    video = write_video(tmp_path / "v" / "take.mp4", 16)
    out = tmp_path / "feats"
    assert _run(engines, [video], out)["written"] == 1
    write_video(video, 24)  # re-recorded in place: new size and mtime
    os.utime(video, ns=(1, 1))
    result = _run(engines, [video], out)
    assert result["written"] == 1 and load_file(str(out / "take.safetensors"))["features"].shape[0] == 3


def test_non_utf8_file_names(engines, tmp_path):
    folder = os.fsencode(tmp_path / "raw")
    os.makedirs(folder)
    name = os.path.join(folder, b"caf\xe9.mp4")  # Latin-1 bytes: not UTF-8
    shutil.copy(write_video(tmp_path / "src.mp4", 16), name)
    out = tmp_path / "feats"
    summary = _run(engines, [os.fsdecode(name)], out)
    assert summary["written"] == 1
    assert json.loads(json.dumps(summary))["outputs"]  # the summary serialises
    assert any(p.suffix == ".safetensors" for p in out.iterdir())


def test_the_chosen_decoder_decodes(monkeypatch, tmp_path):
    """--decoder pyav: the frames come from PyAV even where decord cannot open the file."""
    from egovlp_deploy import decoding as video_module

    path = write_video(tmp_path / "clip.mp4", 20)
    windows, _ = plan_windows(path, 4, window_frames=8, stride_frames=8, backend="pyav")
    expected = ClipPipeline(4, 32, "pyav").clips(path, windows)

    def refuse(self, *args, **kwargs):
        raise RuntimeError("decord cannot read this file")

    monkeypatch.setattr(video_module._DecordVideo, "__init__", refuse)
    video_module._open_video._evict_all()
    np.testing.assert_array_equal(ClipPipeline(4, 32, "pyav").clips(path, windows), expected)


def test_names_do_not_depend_on_the_other_inputs(engines, layout, tmp_path):
    """A alone, then A + B (same stem), then B alone, then A alone: A keeps its first name and is never redone,
    B gets its own and keeps it."""
    _, files = layout
    a, b = files[0], files[1]
    out = tmp_path / "feats"
    first = _run(engines, [a], out)
    both = _run(engines, [a, b], out)
    assert both["outputs"][str(a)] == first["outputs"][str(a)] == "clip"
    assert both["written"] == 1 and both["skipped"] == 1 and both["outputs"][str(b)].startswith("clip-")
    assert _run(engines, [b], out)["skipped"] == 1
    assert _run(engines, [a], out)["skipped"] == 1
    assert sorted(p.name for p in out.glob("*.json")) == sorted(f"{n}.json" for n in both["outputs"].values())


# -- resuming inside a video ----------------------------------------------------------------------------------------
BIN = Path(sys.executable).parent


class Killed(Exception):
    """Stands in for a kill right after a commit."""


def _kill_after(commits):
    def on_commit(n):
        if on_commit.calls == commits:
            raise Killed(n)
        on_commit.calls += 1

    on_commit.calls = 0
    return on_commit


def _count_windows(rt, method):
    """Wrap rt.video_encoder.<method> to count the windows it encodes."""
    real = getattr(rt.video_encoder, method)
    seen = []

    def counting(clips):
        seen.append(len(clips))
        return real(clips)

    setattr(rt.video_encoder, method, counting)
    return seen


def _extract(engines, video, out, rt=None, **kw):
    return extract_features([str(video)], rt or Runtime(engines, warmup=False), out, progress=False, **kw)


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_killed_run_resumes_inside_the_video(engines, tmp_path):
    """SIGKILL after the first committed part of a 32-window video: the rerun encodes only the windows not committed
    and writes exactly the files an uninterrupted run writes."""
    video = write_video(tmp_path / "v" / "long.mp4", 64)
    cmd = [
        str(BIN / "egovlp-deploy"),
        "features",
        str(video),
        "--engines",
        str(engines),
        "--frames",
        "2",
        "--stride",
        "2",
        "--batch",
        "1",
        "--commit-every",
        "1",
        "--quiet",
    ]
    out, ref = tmp_path / "feats", tmp_path / "ref"
    record = out / ".partial" / "long" / "progress.json"
    proc = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not record.is_file():  # the first commit
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.01)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "long.safetensors").exists() and not (out / "long.json").exists()
    committed = json.loads(record.read_text())["done"]
    assert 1 <= committed < 32
    rerun = subprocess.run(cmd + ["--out", str(out), "--json"], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout)
    assert summary["written"] == 1 and summary["windows"] == 32
    assert summary["resumed"] == committed and summary["encoded"] == 32 - committed  # nothing committed redone
    assert not (out / ".partial").exists()
    whole = subprocess.run(cmd + ["--out", str(ref), "--json"], capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert json.loads(whole.stdout)["resumed"] == 0
    assert _files(out) == _files(ref) and set(_files(out)) == {"long.safetensors", "long.json"}


def test_fusion_resumes_bit_for_bit(engines, tmp_path):
    """Fusion features for two queries in npy files, killed after two parts of 3 windows (a part size that is not a
    multiple of the batch): the rerun encodes the other 4 windows and its files equal an uninterrupted run's."""
    video = write_video(tmp_path / "v" / "take.mp4", 40)  # 10 windows of 4 frames
    kw = dict(
        mode="fusion",
        queries=["C opens the box", "C picks up a cup"],
        fmt="npy",
        batch=2,
        commit_every=3,
        frames=4,
        stride=4,
    )
    out, ref = tmp_path / "feats", tmp_path / "ref"
    with pytest.raises(Killed):
        _extract(engines, video, out, on_commit=_kill_after(1), **kw)
    assert [p.name for p in sorted((out / ".partial" / "take").iterdir())] == [
        "part-00000.safetensors",
        "part-00001.safetensors",
        "progress.json",
    ]
    rt = Runtime(engines, warmup=False)
    seen = _count_windows(rt, "fusion_prefix")
    summary = _extract(engines, video, out, rt, **kw)
    assert summary["resumed"] == 6 and sum(seen) == summary["encoded"] == 4
    _extract(engines, video, ref, **kw)
    files = _files(out)
    assert files == _files(ref)
    assert set(files) == {f"take.{k}.npy" for k in ("video_cls", "text_tokens", "text_mask", "timestamps")} | {
        "take.json"
    }
    assert np.load(out / "take.video_cls.npy").shape[:2] == (2, 10)


def test_stale_parts_are_discarded_and_foreign_files_kept(engines, tmp_path):
    """Parts made with other settings are not resumed but deleted; a file the tool did not write stays."""
    video = write_video(tmp_path / "v" / "take.mp4", 40)
    out, ref = tmp_path / "feats", tmp_path / "ref"
    with pytest.raises(Killed):
        _extract(engines, video, out, commit_every=2, batch=2, frames=4, stride=4, on_commit=_kill_after(0))
    work = out / ".partial" / "take"
    (work / "notes.txt").write_text("mine")
    rt = Runtime(engines, warmup=False)
    seen = _count_windows(rt, "encode")
    summary = _extract(engines, video, out, rt, frames=4, stride=8, commit_every=2, batch=2)
    assert summary["resumed"] == 0 and sum(seen) == summary["encoded"] == summary["windows"] == 5
    assert [p.name for p in work.iterdir()] == ["notes.txt"] and (work / "notes.txt").read_text() == "mine"
    _extract(engines, video, ref, frames=4, stride=8, commit_every=2, batch=2)
    assert _files(ref) == {k: v for k, v in _files(out).items() if not k.startswith(".partial/")}
    # a run killed between writing the output and removing its parts: the rerun skips the video and removes them
    (work / "notes.txt").unlink()
    (work / "part-00000.safetensors").write_bytes(b"left over")
    assert _extract(engines, video, out, frames=4, stride=8)["skipped"] == 1
    assert not (out / ".partial").exists()
