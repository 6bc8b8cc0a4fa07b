"""`egovlp-deploy info`: environment, backends, native extension and compute accounting."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from egovlp_deploy.cli import main


def test_info_json_tiny(capsys):
    assert main(["info", "--model", "tiny", "--json", "--text-length", "7"]) == 0
    data = json.loads(capsys.readouterr().out)
    env, model = data["environment"], data["model"]
    assert env["packages"]["torch"] and isinstance(env["onnxruntime_providers"], list)
    assert env["native_extension"]["compiler"]
    assert model["config"] == "tiny" and model["text_length"] == 7
    assert model["cross_attention_gmacs"]["dual video"] == 0 and model["cross_attention_gmacs"]["fusion (VTM)"] > 0
    assert model["params"]["total"] == sum(
        model["params"][k] for k in ("video tower", "text tower", "projections", "fusion heads (VTM, MLM, poolers)")
    )


def test_info_table_base(capsys):
    assert main(["info", "--model", "base", "--frames", "16"]) == 0
    out = capsys.readouterr().out
    assert "native extension  gcc" in out or "native extension  clang" in out
    assert "16 frames of 224px" in out
    assert "params: total" in out and "381.62 M" in out  # 381.61 M + 12 more temporal rows


def test_info_rejects_bad_arguments(capsys):
    try:
        main(["info", "--frames", "0"])
    except SystemExit as exc:
        assert exc.code == 2
    assert "--frames must be positive" in capsys.readouterr().err


def test_info_reports_config_errors(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{}")
    assert main(["info", "--config-file", str(tmp_path / "bad.json")]) == 2
    assert "missing key" in capsys.readouterr().err


def test_console_script_help():
    exe = shutil.which("egovlp-deploy", path=str(Path(sys.executable).parent))
    assert exe, "the console script is installed with the package"
    out = subprocess.run([exe, "info", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--model", "--config-file", "--projection", "--frames", "--text-length", "--json"):
        assert flag in out


def test_native_extension_is_built():
    from egovlp_deploy import _C

    info = _C.build_info()
    assert info["cplusplus"] >= 201703 and info["build_type"] == "release"


def test_sigterm_inside_a_broad_except_still_stops_the_command(monkeypatch, capsys):
    """A library's `except Exception` (the ONNX exporter wraps whatever it meets) must not turn SIGTERM into a
    failure of the command: exit 143 and the one-line interrupt message."""
    import argparse
    import os
    import signal
    import time

    from egovlp_deploy import cli

    def swallowing(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Exception as exc:
            raise ValueError(f"ONNX export failed: {exc!r}") from exc
        return 0

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=swallowing, command="export")
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main([]) == 143
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command, advice",
    [
        ("index", "rerun the same command to continue"),
        ("train", "rerun it with --resume"),
        ("bench", "a rerun starts over"),
        ("synth", "nothing was written"),
        ("demo", "rerun it with --force"),
        ("mcq", "with --out, the answers so far are kept: rerun the same command to continue"),
    ],
)
def test_ctrl_c_says_how_this_command_goes_on(monkeypatch, capsys, command, advice):
    """index, features and mcq --out continue when rerun as they were; train needs --resume, a benchmark starts over,
    the demo refuses its non-empty folder without --force, and synth (which renames its dataset into place only when
    complete) has written nothing."""
    import argparse

    from egovlp_deploy import cli

    def stopped(args):
        raise KeyboardInterrupt

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=stopped, command=command)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main([]) == 130
    assert advice in capsys.readouterr().err


def test_a_closed_output_pipe_stops_quietly(monkeypatch, capsys):
    """`egovlp-deploy search ... | head -1`: the reader has gone; no 'error: [Errno 32] Broken pipe' line and
    exit status 2, but the status of a command stopped by SIGPIPE."""
    import argparse

    from egovlp_deploy import cli

    def printing(args):
        raise BrokenPipeError(32, "Broken pipe")

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=printing, command="search")
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main([]) == 141
    assert capsys.readouterr().err == ""
