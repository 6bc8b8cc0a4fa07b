"""`features` output identity: one output per source file whatever the folder layout, "already done" only for the
same source with the same settings, and the chosen decoder used for the pixels."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from egovlp_deploy.runtime.engines import Runtime
from egovlp_deploy.runtime.features import extract_features
from egovlp_deploy.runtime.pipeline import ClipPipeline, plan_windows

from video_files import write_video


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """Same stems in different folders, the EgoClip chunk layout and digit-named files."""
    root = tmp_path_factory.mktemp("layout")
    files = [root / "a" / "clip.mp4", root / "b" / "clip.mp4", root / "uid" / "0.mp4", root / "uid" / "1.mp4",
             root / "myclips" / "20240101.mp4", root / "myclips" / "20240102.mp4"]
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
    from egovlp_deploy import video as video_module

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
