"""`egovlp-deploy bench preprocess --quick` runs end to end and writes valid JSON, markdown and PNG."""

from __future__ import annotations

import json

import pytest

from egovlp_deploy import preprocess
from egovlp_deploy.cli import main


@pytest.mark.skipif(not preprocess.available(), reason="the C++ extension egovlp_deploy._C is not built")
def test_quick_bench_writes_json_markdown_and_png(tmp_path, capsys):
    assert main(["bench", "preprocess", "--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "preprocess.json").read_text())
    assert report["threads"] == 1 and report["git_sha"] and report["machine"]["extension"]["cplusplus"] >= 201703
    (row,) = report["rows"]
    assert row["frames"] == 2 and row["reference_ms"] > 0 and row["cpp_fp32_ms"] > 0 and row["speedup"] > 0
    assert set(row["decode"]) >= {"decord", "pyav"}
    table = (tmp_path / "preprocess.md").read_text()
    assert "| input | frames | torch ref (ms)" in table and "| 48p (48x64) | 2 |" in table
    assert (tmp_path / "preprocess.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "speedup" not in capsys.readouterr().err


def test_bench_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "preprocess", "--help"])
    out = capsys.readouterr().out
    for flag in ("--inputs", "--frames", "--threads", "--repeats", "--quick", "--out", "--no-decode"):
        assert flag in out
