"""Engines whose validation failed at export (`--allow-mismatch`, or an export that exited 1) still load, but the
runtime says so, once per artifact, as a one-line warning on the command line."""

import json
import warnings

import numpy as np
import pytest

from egovlp_deploy.runtime.commands import runtime_warnings
from egovlp_deploy.runtime.engines import FailedValidationWarning, Runtime


def _fail_validation_of(folder, role):
    manifest = json.loads((folder / "manifest.json").read_text())
    for artifact in manifest["artifacts"]:
        if artifact["role"] == role:
            artifact["validation"]["passed"] = False
    manifest["validation"]["passed"] = False
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_an_artifact_that_failed_validation_is_named_when_it_loads(engines_copy):
    _fail_validation_of(engines_copy, "text_encoder")
    rt = Runtime(engines_copy, warmup=False)
    v = rt.folder.config.video
    clip = np.zeros((1, v.num_frames, 3, v.img_size, v.img_size), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FailedValidationWarning)
        rt.video_encoder.encode(clip)  # its video encoder passed: no warning
    with pytest.warns(FailedValidationWarning, match=r"text_encoder.*failed its validation against PyTorch"):
        rt.text_encoder.encode(["C opens the box"])


def test_the_command_line_shows_it_as_one_line(capsys):
    with runtime_warnings():
        warnings.warn(FailedValidationWarning("engines/onnx/text_encoder.onnx: failed its validation"), stacklevel=1)
    assert capsys.readouterr().err == "warning: engines/onnx/text_encoder.onnx: failed its validation\n"
