"""The exporter and the readers of its folders against folders it did not make or did not finish: a non-empty --out
that is no export folder, user files in OUT/tokenizer, a re-export over another model's folder, an interrupted
re-export, manifests with fields of the wrong type, and options the installation or the model cannot serve."""

import json
import shutil
import warnings

import pytest

from egovlp_deploy.cli import main
from egovlp_deploy.export import runner
from egovlp_deploy.export.manifest import INCOMPLETE, Manifest, load_manifest
from egovlp_deploy.export.runner import ExportOptions, run_export
from egovlp_deploy.runtime.engines import EngineError, EngineFolder, Runtime, UnverifiedTokenizerWarning
from egovlp_deploy.tokenizer import train_demo_tokenizer
from official_format import saved_random_tiny

FAST = dict(roles=("text_encoder",), max_text_len=16, task_checks=False, ort_optimize="never")


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A model saved as a training run keeps it: RUN/checkpoint beside RUN/tokenizer."""
    run = tmp_path_factory.mktemp("hostile") / "run"
    saved_random_tiny(run / "checkpoint", seed=5)
    train_demo_tokenizer(run / "tokenizer")
    return run


@pytest.fixture(scope="module")
def exported(run_dir):
    """An export of the run's text encoder, its tokenizer copied in and recorded."""
    out = run_dir.parent / "engines"
    result = run_export(str(run_dir / "checkpoint"), out, ExportOptions(**FAST), quiet=True)
    assert result.passed, result.errors
    assert load_manifest(out).tokenizer["files"]
    return out


@pytest.fixture
def engines_copy(exported, tmp_path):
    dst = tmp_path / "engines"
    shutil.copytree(exported, dst)
    return dst


# -- what --out may be --------------------------------------------------------------------------------------------
def test_a_non_empty_folder_that_is_no_export_is_refused_untouched(tmp_path, capsys):
    user = tmp_path / "userdir"
    (user / "tokenizer").mkdir(parents=True)
    (user / "tokenizer" / "notes.txt").write_text("notes")
    (user / "tokenizer" / "vocab.json").write_text("keep")
    before = _tree(user)
    args = ["export", "--checkpoint", "random:tiny", "--out", str(user), "--roles", "text_encoder", "--quiet"]
    assert main(args) == 2
    assert "not empty and not an egovlp-deploy export folder" in capsys.readouterr().err
    assert _tree(user) == before


def test_a_foreign_manifest_json_is_refused_untouched(tmp_path, capsys):
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "manifest.json").write_text('{"name": "my web app"}')
    before = _tree(tmp_path / "web")
    assert main(["export", "--checkpoint", "random:tiny", "--out", str(tmp_path / "web"), "--quiet"]) == 2
    assert "manifest.json is not one this exporter can read" in capsys.readouterr().err
    assert _tree(tmp_path / "web") == before


def test_files_we_did_not_write_in_the_tokenizer_folder_are_refused_before_anything_is_written(
    run_dir, engines_copy, capsys
):
    (engines_copy / "tokenizer" / "notes.txt").write_text("my notes")
    before = _tree(engines_copy)
    args = ["export", "--checkpoint", str(run_dir / "checkpoint"), "--out", str(engines_copy), "--quiet"]
    assert main(args + ["--roles", "text_encoder", "--max-text-len", "16", "--ort-optimize", "never"]) == 2
    assert "holds notes.txt, which no earlier export of this folder wrote" in capsys.readouterr().err
    assert _tree(engines_copy) == before  # the manifest too: nothing was retired


# -- re-exports over an export folder -------------------------------------------------------------------------------
def test_a_reexport_without_tokenizer_removes_the_earlier_one_and_keeps_user_files(engines_copy):
    (engines_copy / "tokenizer" / ".my_settings").write_text("mine")  # hidden: no tokenizer reads it
    (engines_copy / "NOTES.md").write_text("mine")
    result = run_export("random:tiny", engines_copy, ExportOptions(**FAST), quiet=True)
    assert result.passed, result.errors
    assert load_manifest(engines_copy).tokenizer == {}
    assert [p.name for p in (engines_copy / "tokenizer").iterdir()] == [".my_settings"]
    assert (engines_copy / "NOTES.md").read_text() == "mine"
    assert not (engines_copy / INCOMPLETE).exists()
    with pytest.raises(EngineError, match="no tokenizer found"):  # not the earlier model's tokenizer
        Runtime(engines_copy).text_encoder.encode(["#C C opens the box"])


def test_a_tokenizer_put_in_by_hand_is_used_with_a_warning(run_dir, engines_copy):
    run_export("random:tiny", engines_copy, ExportOptions(**FAST), quiet=True)
    train_demo_tokenizer(engines_copy / "tokenizer")
    with pytest.warns(UnverifiedTokenizerWarning, match="not recorded in the engines' manifest"):
        Runtime(engines_copy).text_encoder.encode(["#C C opens the box"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedTokenizerWarning)
        Runtime(engines_copy, tokenizer=run_dir / "tokenizer").text_encoder.encode(["#C C opens the box"])


def test_an_interrupted_reexport_leaves_an_incomplete_folder_and_a_rerun_finishes_it(engines_copy, monkeypatch):
    def interrupted(*args, **kwargs):  # the first artifact is replaced by now
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "validate_artifact", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_export("random:tiny", engines_copy, ExportOptions(**FAST), quiet=True)
    assert not (engines_copy / "manifest.json").exists()
    assert (engines_copy / INCOMPLETE).is_file()
    with pytest.raises(EngineError, match="incomplete export .*run the export again"):
        EngineFolder(engines_copy)
    assert main(["info", str(engines_copy)]) == 2
    monkeypatch.undo()
    result = run_export("random:tiny", engines_copy, ExportOptions(**FAST), quiet=True)
    assert result.passed, result.errors
    assert not (engines_copy / INCOMPLETE).exists()
    assert not (engines_copy / "tokenizer").exists()  # the record kept the earlier export's tokenizer ours
    Runtime(engines_copy).runner("text_encoder")


# -- options the installation or the model cannot serve -------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--opset", "99"], "--opset 99: this installation exports and runs ONNX opsets 18 to"),
        (["--format", "program", "--torch-device", "tpu"], "--torch-device must be cpu, cuda or cuda:N"),
        (["--max-text-len", "100000"], "--max-text-len 100000: the model takes at most 64 text tokens"),
    ],
)
def test_options_beyond_what_can_run_are_one_line_errors(tmp_path, capsys, extra, message):
    assert main(["export", "--checkpoint", "random:tiny", "--out", str(tmp_path / "out"), "--quiet", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_newest_supported_opset_is_accepted():
    from egovlp_deploy.export.onnx_export import max_opset

    ExportOptions(opset=max_opset()).check()
    ExportOptions(formats=("program",), torch_device="cuda:1").check()


def test_an_export_failure_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    from egovlp_deploy.export.onnx_export import ExportError

    def fails(*args, **kwargs):
        raise ExportError("ONNX export of text_encoder failed: because")

    monkeypatch.setattr(runner, "run_export", fails)
    assert main(["export", "--checkpoint", "random:tiny", "--out", str(tmp_path), "--quiet"]) == 1
    assert capsys.readouterr().err == "egovlp-deploy export: error: ONNX export of text_encoder failed: because\n"


# -- manifests and configs with fields of the wrong type ------------------------------------------------------------
def _artifact(m):
    return m["artifacts"][0]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(export=[]), "manifest key export is [], expected an object"),
        (lambda m: m["export"].update(max_batch=None), "manifest key export.max_batch is null, expected an integer"),
        (lambda m: _artifact(m).update(io="x"), 'manifest key artifacts[0].io is "x", expected an object'),
        (lambda m: _artifact(m).update(opset="20"), 'artifacts[0].opset is "20", expected an integer or null'),
        (lambda m: _artifact(m).update(bytes="12"), 'artifacts[0].bytes is "12", expected an integer >= 0'),
        (lambda m: _artifact(m)["io"]["inputs"].append(3), "artifacts[0].io.inputs[2] is 3, expected an object"),
        (lambda m: m["model_config"].update(video=[]), "model_config: video must be a JSON object"),
    ],
)
def test_manifest_fields_of_the_wrong_type_are_engine_errors(engines_copy, capsys, edit, message):
    path = engines_copy / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    with pytest.raises(EngineError) as caught:
        EngineFolder(engines_copy)
    assert message in str(caught.value)
    assert main(["info", str(engines_copy)]) == 2
    assert message in capsys.readouterr().err


def test_a_minimal_manifest_still_loads(tmp_path):
    Manifest(source_checkpoint={}, model_config={}, export={}).save(tmp_path)
    assert load_manifest(tmp_path).artifacts == []


def test_info_on_a_config_with_a_section_of_the_wrong_type(run_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run_dir / "checkpoint", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "video": []}))
    assert main(["info", str(ckpt)]) == 2
    assert "config.json: video must be a JSON object, got list" in capsys.readouterr().err


def test_a_second_export_into_a_folder_being_written_is_refused(run_dir, tmp_path):
    """Two exports into one folder would overwrite each other's artifacts under one manifest."""
    from egovlp_deploy.folder_lock import exclusive_writer

    out = tmp_path / "engines"
    out.mkdir()
    with exclusive_writer(out, "export folder", ValueError):  # another export, in progress
        with pytest.raises(ValueError, match="another process is writing this export folder now"):
            run_export(str(run_dir / "checkpoint"), out, ExportOptions(**FAST), quiet=True)
    assert list(out.iterdir()) == []
    with pytest.raises(ValueError, match="at most"):  # refused before writing: no empty folder is left behind
        run_export(str(run_dir / "checkpoint"), tmp_path / "new", ExportOptions(**{**FAST, "max_text_len": 10**5}))
    assert not (tmp_path / "new").exists()
