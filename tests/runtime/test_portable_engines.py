"""An engines folder runs text queries anywhere: the export copies the run's tokenizer in and hashes it in the
manifest, and records the checkpoint by its absolute path; an index records its engines folder absolutely."""

import json
import shutil

import numpy as np
import pytest

from egovlp_deploy.export.runner import ExportOptions, run_export
from egovlp_deploy.runtime.engines import EngineError, Runtime
from egovlp_deploy.tokenizer import train_demo_tokenizer
from official_format import saved_random_tiny


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("portable")
    run = base / "run"
    saved_random_tiny(run / "checkpoint", seed=3)
    train_demo_tokenizer(run / "tokenizer")
    opts = ExportOptions(roles=("text_encoder",), task_checks=False, ort_optimize="never")
    result = run_export(str(run / "checkpoint"), base / "engines", opts, quiet=True)
    assert result.passed, result.errors
    return base


def test_the_export_carries_its_tokenizer(exported):
    manifest = json.loads((exported / "engines" / "manifest.json").read_text())
    assert manifest["tokenizer"]["dir"] == "tokenizer"
    assert "tokenizer.json" in manifest["tokenizer"]["files"]
    assert manifest["source_checkpoint"]["path"] == str((exported / "run" / "checkpoint").resolve())


def test_a_moved_engines_folder_encodes_text_without_the_run(exported, tmp_path):
    reference = Runtime(exported / "engines").text_encoder.encode(["#C C opens the box"]).embedding
    moved = tmp_path / "elsewhere" / "engines"
    shutil.copytree(exported / "engines", moved)
    hidden = exported / "run_hidden"
    (exported / "run").rename(hidden)  # the training run (checkpoint and tokenizer) out of view
    try:
        got = Runtime(moved).text_encoder.encode(["#C C opens the box"]).embedding
    finally:
        hidden.rename(exported / "run")
    np.testing.assert_array_equal(got, reference)


def test_a_changed_tokenizer_file_is_refused(exported, tmp_path):
    copy = tmp_path / "engines"
    shutil.copytree(exported / "engines", copy)
    tokenizer = copy / "tokenizer" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text() + " ")  # still valid JSON, another file
    with pytest.raises(EngineError, match="tokenizer.json: sha256 differs"):
        Runtime(copy).text_encoder.encode(["#C C opens the box"])


def test_an_index_records_its_engines_by_absolute_path(engines, video_root, tmp_path, monkeypatch):
    from egovlp_deploy.runtime.index import IndexSettings, build_index

    shutil.copytree(engines, tmp_path / "engines")
    monkeypatch.chdir(tmp_path)
    build_index(
        "idx",
        [str(video_root / "vid_a" / "0.mp4")],
        Runtime("engines"),
        IndexSettings(frames=4, window_sec=1.0, stride_sec=1.0),
        progress=False,
    )
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["engines"] == str(tmp_path / "engines")
