"""`egovlp-deploy mcq --out` checked as `eval --predictions` is, before any engine loads or video is read: the answers
are written after the last question, so a path that cannot take them would lose the whole run."""

from __future__ import annotations

from egovlp_deploy.cli import main
from egovlp_deploy.runtime import commands


def test_out_in_a_folder_that_is_not_writable_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    questions = tmp_path / "egomcq.json"
    questions.write_text("{}")
    monkeypatch.setattr(commands.os, "access", lambda path, mode: False)  # root may write anywhere
    out = tmp_path / "answers.json"
    args = ["mcq", str(questions), "--video-root", str(tmp_path), "--engines", str(tmp_path / "no_engines")]
    assert main([*args, "--out", str(out)]) == 2  # the engines folder does not exist: refused before it is read
    assert capsys.readouterr().err.strip() == f"egovlp-deploy mcq: error: --out {out}: its folder is not writable"
    assert not out.exists()
