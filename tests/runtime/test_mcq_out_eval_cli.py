"""`egovlp-deploy mcq --out` checked as `eval --predictions` is, before any engine loads or video is read: the answers
are written after the last question, so a path that cannot take them would lose the whole run."""

from __future__ import annotations

import os
from pathlib import Path

from egovlp_deploy.checkpoint import atomic_write_bytes, check_output_file
from egovlp_deploy.cli import main


def test_out_in_a_folder_that_is_not_writable_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    questions = tmp_path / "egomcq.json"
    questions.write_text("{}")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root may write anywhere
    out = tmp_path / "answers.json"
    args = ["mcq", str(questions), "--video-root", str(tmp_path), "--engines", str(tmp_path / "no_engines")]
    assert main([*args, "--out", str(out)]) == 2  # the engines folder does not exist: refused before it is read
    # (the last line: a compile cache found unwritable by the same os.access has a note before it)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"egovlp-deploy mcq: error: --out {out}: its folder is not writable"
    assert not out.exists()


def _read_only(monkeypatch, folder):
    """os.access says `folder` cannot be written (a chmod would not show it: root may write anywhere)."""
    access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: Path(path).resolve() != folder.resolve() and access(path, mode)
    )


def _mcq(tmp_path, out):
    questions = tmp_path / "egomcq.json"
    questions.write_text("{}")
    args = ["mcq", str(questions), "--video-root", str(tmp_path), "--engines", str(tmp_path / "no_engines")]
    return main([*args, "--out", str(out)])


def test_out_link_in_a_read_only_folder_is_refused_though_it_points_into_a_writable_one(tmp_path, capsys, monkeypatch):
    """atomic_write_bytes makes its temp file next to the link, not next to its target: the link's folder decides."""
    (tmp_path / "ro").mkdir()
    (tmp_path / "rw").mkdir()
    out = tmp_path / "ro" / "answers.json"
    out.symlink_to(tmp_path / "rw" / "answers.json")
    _read_only(monkeypatch, tmp_path / "ro")
    assert _mcq(tmp_path, out) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"egovlp-deploy mcq: error: --out {out}: its folder is not writable"


def test_out_link_in_a_writable_folder_into_a_read_only_one_is_accepted_and_replaced_by_the_file(
    tmp_path, capsys, monkeypatch
):
    (tmp_path / "ro").mkdir()
    (tmp_path / "rw").mkdir()
    target = tmp_path / "ro" / "answers.json"
    target.write_text("old answers")
    out = tmp_path / "rw" / "answers.json"
    out.symlink_to(target)
    _read_only(monkeypatch, tmp_path / "ro")
    check_output_file(out, "--out")
    assert _mcq(tmp_path, out) == 2  # refused for the engines folder that does not exist, not for --out
    err = capsys.readouterr().err
    assert "no_engines" in err and f"--out {out}" not in err
    atomic_write_bytes(out, b"{}")  # the rename replaces the link itself: the read-only folder is never written
    assert not out.is_symlink() and out.read_bytes() == b"{}" and target.read_text() == "old answers"


def test_out_inside_the_engines_folder_is_refused_before_the_run(tmp_path, capsys):
    """`--out ENGINES/manifest.json` replaced the folder's manifest with the answers (the folder was then no engines
    folder at all); any path inside the engines (or tokenizer) folder is refused, nothing written."""
    questions = tmp_path / "egomcq.json"
    questions.write_text("{}")
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "manifest.json").write_text("the manifest")
    for out in (engines / "manifest.json", engines / "answers.json"):
        args = ["mcq", str(questions), "--video-root", str(tmp_path), "--engines", str(engines), "--out", str(out)]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"--out {out}: is inside the --engines folder {engines}; name a file outside it")
    assert sorted(p.name for p in engines.iterdir()) == ["manifest.json"]
    assert (engines / "manifest.json").read_text() == "the manifest"
