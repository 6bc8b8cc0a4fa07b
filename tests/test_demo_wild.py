"""`demo` and `synth` output folders in odd states: symlinks (to a folder, dangling), two processes into one folder,
an unwritable parent, an interrupted run. Nothing we did not write is deleted or replaced, and every refusal is one
named error."""

import json
import os

import pytest

from egovlp_deploy import checkpoint, cli, demo
from egovlp_deploy.data import synth
from egovlp_deploy.folder_lock import exclusive_writer

SMALL = {"train_videos": 1, "eval_videos": 2, "clips_per_video": 2, "clip_seconds": 1.0, "fps": 4, "size": 16}


class _Stop(Exception):
    """Raised by the stubbed first stage: the test has seen what it needs."""


def _old_demo(folder):
    """A finished demo's folder, as far as --force looks at it."""
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "meta.json").write_text("{}")
    (folder / "report.md").write_text("old report")
    (folder / demo.MARKER).write_text(json.dumps({"format": demo.MARKER_FORMAT}))


def _stop_at_the_first_stage(monkeypatch, seen):
    def first_stage(out, **kwargs):
        seen.append(sorted(p.name for p in out.parent.iterdir()))
        raise _Stop

    monkeypatch.setattr(synth, "generate", first_stage)


# -- demo ---------------------------------------------------------------------------------------------------------
def test_demo_force_never_deletes_a_folder_another_demo_is_writing(tmp_path, monkeypatch):
    out = tmp_path / "demo_out"
    _old_demo(out)
    seen = []
    _stop_at_the_first_stage(monkeypatch, seen)
    with exclusive_writer(out, "demo folder", ValueError):  # a demo still running in this folder
        with pytest.raises(ValueError, match="another process is writing this demo folder now"):
            demo.run_demo(out, force=True)
    assert (out / "report.md").read_text() == "old report" and (out / "data" / "meta.json").is_file()
    assert seen == []


def test_demo_force_through_a_symlink_replaces_the_contents_and_keeps_the_link(tmp_path, monkeypatch):
    real = tmp_path / "real_demo"
    _old_demo(real)
    link = tmp_path / "demo_link"
    link.symlink_to(real)
    seen = []
    _stop_at_the_first_stage(monkeypatch, seen)
    with pytest.raises(_Stop):
        demo.run_demo(link, force=True)
    assert link.is_symlink() and seen == [[demo.MARKER]]
    assert sorted(p.name for p in real.iterdir()) == [demo.MARKER]


def test_demo_force_deletes_its_marker_last(tmp_path, monkeypatch):
    """A deletion that fails half way (a file that cannot be removed, Ctrl-C) leaves the marker, so the next
    `demo --force` still recognises the folder."""
    out = tmp_path / "demo_out"
    _old_demo(out)

    def rmtree_fails(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(demo.shutil, "rmtree", rmtree_fails)
    with pytest.raises(PermissionError):
        demo.run_demo(out, force=True)
    assert (out / demo.MARKER).is_file()
    demo.check_replaceable(out)  # still the demo's: the next --force goes ahead


def test_demo_out_a_dangling_symlink_is_named(tmp_path):
    link = tmp_path / "demo_out"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="a symlink to .*nowhere, which does not exist"):
        demo.run_demo(link)
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


# -- synth --------------------------------------------------------------------------------------------------------
def test_synth_into_a_symlink_to_an_empty_folder_writes_there_and_keeps_the_link(tmp_path):
    (tmp_path / "target").mkdir()
    link = tmp_path / "ds"
    link.symlink_to("target")
    synth.generate(link, **SMALL)
    assert link.is_symlink() and (tmp_path / "target" / "meta.json").is_file()
    synth.generate(link, force=True, seed=1, **SMALL)  # and --force replaces the dataset behind the link
    assert link.is_symlink() and json.loads((tmp_path / "target" / "meta.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "target"]


def test_synth_into_a_dangling_symlink_is_named(tmp_path):
    link = tmp_path / "ds"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="a symlink to .*nowhere, which does not exist"):
        synth.generate(link, **SMALL)
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_synth_without_force_never_replaces_a_dataset_written_meanwhile(tmp_path, monkeypatch):
    """Two `synth OUT` at once: the one finishing second refuses, instead of silently replacing the first's."""
    out = tmp_path / "ds"
    render = synth._render_one
    other = []

    def another_synth_finishes_first(job):
        if not other:
            other.append(True)
            monkeypatch.setattr(synth, "_render_one", render)
            synth.generate(out, seed=7, **SMALL)
        return render(job)

    monkeypatch.setattr(synth, "_render_one", another_synth_finishes_first)
    with pytest.raises(ValueError, match="not empty any more.*nothing was replaced"):
        synth.generate(out, seed=1, **SMALL)
    assert json.loads((out / "meta.json").read_text())["seed"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # our temp folder removed


def test_synth_in_an_unwritable_parent_names_the_folder_not_a_temp_name(tmp_path, monkeypatch):
    def refused(parent, prefix):
        raise PermissionError(13, "Permission denied", f"{parent}/{prefix}abc")

    monkeypatch.setattr(checkpoint, "make_temp_dir", refused)
    with pytest.raises(ValueError, match=r"ds: cannot build the dataset in its parent folder .* \(Permission denied\)"):
        synth.generate(tmp_path / "ds", **SMALL)


def test_an_interrupted_synth_leaves_nothing_and_a_plain_rerun_works(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ds"
    render = synth._render_one

    def interrupted(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "_render_one", interrupted)
    args = ["synth", str(out), "--workers", "1", "--train-videos", "1", "--eval-videos", "2", "--size", "16"]
    assert cli.main(args) == 130
    err = capsys.readouterr().err
    assert "--force" not in err and "rerun it to start again" in err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synth, "_render_one", render)
    assert cli.main(args + ["--clips-per-video", "2", "--fps", "4"]) == 0


def _report(preprocessing):
    """The fields `demo._format` reads, as `run_demo` fills them."""
    retrieval = {"queries": 2, "distinct_narrations": 2, "R@1": 50.0, "R@5": 100.0}
    return {
        "out": "demo_out",
        "total_s": 1.0,
        "train": {"steps": 3, "minutes": 0.1},
        "backend": [{"provider": "CPUExecutionProvider"}],
        "index": {"preprocessing": preprocessing, "ms_per_clip": {"preprocess": 1.0}},
        "retrieval": retrieval | {"R@1 reranked top10": 50.0, "chance R@1": 50.0},
        "mcq": {"questions": 1, "accuracy": {"dual": {"all": 100.0}}},
        "latency_ms": {"preprocess": 1.0},
        "stages_s": {"indexing": 0.1},
    }


def test_demo_report_says_which_preprocessing_gave_its_latency():
    """Without the C++ extension the numbers are the same (the torch reference) but the preprocess latency is not
    the C++ one: the printed table says which path it timed."""
    text = demo._format(_report("torch reference (C++ extension not built)"), "")
    assert (
        "Latency per clip / query (ms, this machine; preprocessing: torch reference (C++ extension not built))" in text
    )
    assert "preprocessing: C++ (egovlp_deploy._C)" in demo._format(_report("C++ (egovlp_deploy._C)"), "")


def test_demo_refuses_a_non_utf8_out_before_any_work(tmp_path, monkeypatch):
    """The training stage saves the tokenizer with Hugging Face tokenizers, which takes only UTF-8 paths: a folder
    name of other bytes failed there, after the dataset was rendered, with a bare UnicodeEncodeError."""
    seen = []
    _stop_at_the_first_stage(monkeypatch, seen)
    out = tmp_path / os.fsdecode(b"demo\xffout")
    with pytest.raises(ValueError, match=r"demo\\xffout: not valid UTF-8"):
        demo.run_demo(out)
    assert seen == [] and not os.path.lexists(out)
