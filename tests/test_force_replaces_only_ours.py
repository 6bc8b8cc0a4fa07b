"""`synth --force` and `demo --force` replace a folder only if they wrote it and it holds nothing else: a mistyped
--out (a home folder, a project, a dataset) is refused with nothing deleted."""

import json

import pytest

from egovlp_deploy import demo
from egovlp_deploy.data import synth

SMALL = {"train_videos": 2, "eval_videos": 2, "clips_per_video": 2, "clip_seconds": 1.0, "fps": 4, "size": 64}


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def users_folder(tmp_path):
    folder = tmp_path / "mine"
    (folder / "videos").mkdir(parents=True)
    (folder / "videos" / "holiday.mp4").write_bytes(b"not ours")
    (folder / "notes.txt").write_text("keep me")
    return folder


def test_synth_force_refuses_a_folder_it_did_not_write(users_folder):
    before = _tree(users_folder)
    with pytest.raises(ValueError, match="not a dataset written by egovlp-deploy synth.*nothing was deleted"):
        synth.generate(users_folder, force=True, **SMALL)
    assert _tree(users_folder) == before


def test_synth_force_refuses_its_dataset_holding_other_files(tmp_path):
    out = tmp_path / "ds"
    synth.generate(out, **SMALL)
    (out / "my_features").mkdir()
    (out / "my_features" / "a.npy").write_bytes(b"x")
    with pytest.raises(ValueError, match="did not write \\(my_features\\)"):
        synth.generate(out, force=True, seed=1, **SMALL)
    assert (out / "my_features" / "a.npy").read_bytes() == b"x"
    assert json.loads((out / "meta.json").read_text())["seed"] == 0


def test_synth_force_replaces_its_own_dataset(tmp_path):
    out = tmp_path / "ds"
    synth.generate(out, **SMALL)
    synth.generate(out, force=True, seed=1, **SMALL)
    assert json.loads((out / "meta.json").read_text())["seed"] == 1


def test_demo_force_refuses_a_folder_it_did_not_write(users_folder, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the demo started on a folder it must not replace")

    monkeypatch.setattr(synth, "generate", never)
    before = _tree(users_folder)
    with pytest.raises(ValueError, match="not a folder written by egovlp-deploy demo.*nothing was deleted"):
        demo.run_demo(users_folder, force=True)
    assert _tree(users_folder) == before


def test_demo_marks_its_folder_first_so_an_interrupted_demo_is_replaced(tmp_path, monkeypatch):
    """The demo stopped during its first stage: the folder holds the marker and the dataset's temp folder, and
    `demo --force` (what the Ctrl-C advice says) starts again."""
    out = tmp_path / "demo_out"
    calls = []

    def stopped(folder, *a, **k):
        calls.append(sorted(p.name for p in out.iterdir()))
        (out / ".data.tmp-abc123").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "generate", stopped)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out)
    assert json.loads((out / demo.MARKER).read_text()) == {"format": demo.MARKER_FORMAT}
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, force=True)
    assert calls == [[demo.MARKER], [demo.MARKER]]  # the second run started on a fresh folder


def test_demo_force_refuses_its_folder_holding_other_files(tmp_path):
    out = tmp_path / "demo_out"
    (out / "data").mkdir(parents=True)
    (out / demo.MARKER).write_text(json.dumps({"format": demo.MARKER_FORMAT}))
    (out / "thesis.tex").write_text("keep me")
    with pytest.raises(ValueError, match="did not write \\(thesis.tex\\)"):
        demo.run_demo(out, force=True)
    assert (out / "thesis.tex").read_text() == "keep me"


def test_a_folder_of_demo_like_names_without_the_marker_is_not_replaced(tmp_path):
    """A project holding a synth dataset as data/ and a training run as run/ (the names the demo uses) is not a demo
    folder: only the marker makes one."""
    out = tmp_path / "project"
    synth.generate(out / "data", **SMALL)
    (out / "run").mkdir()
    (out / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="not a folder written by egovlp-deploy demo"):
        demo.run_demo(out, force=True)
    assert (out / "run" / "metrics.jsonl").is_file() and (out / "data" / "meta.json").is_file()


def test_demo_out_naming_a_file_is_a_clear_error(tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        demo.run_demo(target)
    assert target.read_text() == "x"


def test_demo_without_onnxruntime_says_so_before_it_starts(tmp_path, monkeypatch, capsys):
    """The demo's export, index and EgoMCQ stages need onnxruntime (the cpu or gpu extra): an installation without
    it is told at once, not after the dataset and minutes of training."""
    import importlib.util

    from egovlp_deploy import cli

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "onnxruntime" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(synth, "generate", lambda *a, **k: pytest.fail("the demo started without onnxruntime"))
    assert cli.main(["demo", "--out", str(tmp_path / "demo_out")]) == 2
    assert "onnxruntime is not installed (it comes with the cpu or gpu extra" in capsys.readouterr().err
    assert not (tmp_path / "demo_out").exists()


def test_synth_force_checks_the_folder_again_before_it_replaces_it(tmp_path, monkeypatch):
    """A file put into the dataset while synth --force renders the new one (minutes at full size) is not deleted."""
    out = tmp_path / "ds"
    synth.generate(out, **SMALL)
    render = synth._render_one

    def render_while_someone_writes(job):
        (out / "run").mkdir(exist_ok=True)  # e.g. `train --output ds/run` started meanwhile
        return render(job)

    monkeypatch.setattr(synth, "_render_one", render_while_someone_writes)
    with pytest.raises(ValueError, match="did not write \\(run\\)"):
        synth.generate(out, force=True, seed=1, **SMALL)
    assert (out / "run").is_dir() and json.loads((out / "meta.json").read_text())["seed"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # the new dataset's temp folder removed
