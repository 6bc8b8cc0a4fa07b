"""`egovlp-deploy info`: environment, backends, native extension and compute accounting."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

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
