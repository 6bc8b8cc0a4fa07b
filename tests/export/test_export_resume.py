"""An interrupted export, rerun: the steps it finished (each artifact made and validated, each task check) are kept
when their files still hash as recorded and the checkpoint, settings, tools and code are the same; everything else is
done again. A paper-size export takes tens of minutes on a CPU, so a Ctrl-C near its end must not cost all of it."""

import json

import pytest

from egovlp_deploy.export import onnx_export, runner
from egovlp_deploy.export import precision as precision_module
from egovlp_deploy.export.manifest import INCOMPLETE, load_manifest, verify_artifact
from egovlp_deploy.export.runner import ExportOptions, run_export

ROLES = ("text_encoder", "video_encoder")


def options(**kw):
    base = dict(roles=ROLES, max_text_len=8, max_batch=2, ort_optimize="never", task_checks=False)
    return ExportOptions(**{**base, **kw})


class Interrupt(BaseException):
    """Stands for Ctrl-C (a BaseException like KeyboardInterrupt)."""


def interrupt_at(monkeypatch, module, name, call):
    """Make `module.name` raise Interrupt at its `call`-th call (1-based); returns the list of calls' first args."""
    real = getattr(module, name)
    calls = []

    def wrapped(*args, **kw):
        calls.append(args)
        if len(calls) == call:
            raise Interrupt
        return real(*args, **kw)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def count_calls(monkeypatch, module, name):
    real = getattr(module, name)
    calls = []

    def wrapped(*args, **kw):
        calls.append(args)
        return real(*args, **kw)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def exported_roles(calls):
    return [args[1] for args in calls]


def interrupted(monkeypatch, out, opts, module=runner, name="validate_artifact", call=3):
    with monkeypatch.context() as m:
        interrupt_at(m, module, name, call)
        with pytest.raises(Interrupt):
            run_export("random:tiny", out, opts, quiet=True)
    assert (out / INCOMPLETE).is_file()
    return json.loads((out / INCOMPLETE).read_text())


def finish(monkeypatch, out, opts, capfd):
    exports = count_calls(monkeypatch, onnx_export, "export_onnx")
    capfd.readouterr()
    result = run_export("random:tiny", out, opts)
    log = capfd.readouterr().err
    assert result.passed, result.errors
    assert not (out / INCOMPLETE).exists()
    manifest = load_manifest(out)
    for entry in manifest.artifacts:
        verify_artifact(out, entry)
    return result, manifest, exported_roles(exports), log


def test_a_rerun_keeps_the_artifacts_an_interrupted_export_finished(monkeypatch, tmp_path, capfd):
    out = tmp_path / "engines"
    opts = options(precisions=("int8",))
    record = interrupted(monkeypatch, out, opts, call=2)  # text int8 done; the video encoder's check cut short
    assert sorted(record["done"]) == ["onnx/int8/text_encoder"]
    kept = out / "onnx" / "int8" / "text_encoder.onnx"
    mtime = kept.stat().st_mtime_ns

    result, manifest, exported, log = finish(monkeypatch, out, opts, capfd)
    assert exported == ["video_encoder"]  # the text encoder's fp32 source is not exported again
    assert "continuing an unfinished export (1 finished steps recorded)" in log
    assert log.count("kept from the unfinished export") == 1
    assert kept.stat().st_mtime_ns == mtime
    assert sorted(a.file for a in manifest.artifacts) == ["onnx/int8/text_encoder.onnx", "onnx/int8/video_encoder.onnx"]
    assert not any((out / "onnx" / "fp32").glob("*")), "an fp32 source graph left behind"
    kept_entry = next(a for a in manifest.artifacts if a.file == "onnx/int8/text_encoder.onnx")
    assert kept_entry.validation == record["done"]["onnx/int8/text_encoder"]["entry"]["validation"]
    assert [c.name for c in result.checks] == ["text_encoder/int8", "video_encoder/int8"]
    assert len(json.loads((out / "validation.json").read_text())["checks"]) == 2


TEXT = dict(roles=("text_encoder",))


def test_a_rerun_with_other_settings_starts_over(monkeypatch, tmp_path, capfd):
    out = tmp_path / "engines"
    interrupted(monkeypatch, out, options(**TEXT), name="write_report", call=1)  # stopped after its one step
    _, _, exported, log = finish(monkeypatch, out, options(**TEXT, max_text_len=12), capfd)
    assert exported == ["text_encoder"]
    assert "kept from the unfinished export" not in log
    assert "unfinished export with other settings, checkpoint, tools or code: starting over" in log


def test_formats_precisions_and_roles_are_no_part_of_the_identity(monkeypatch, tmp_path, capfd):
    """Asking for one more precision in the rerun keeps what the interrupted run finished."""
    out = tmp_path / "engines"
    interrupted(monkeypatch, out, options(**TEXT), name="write_report", call=1)
    quantized = count_calls(monkeypatch, precision_module, "to_int8")
    _, manifest, exported, log = finish(monkeypatch, out, options(**TEXT, precisions=("fp32", "int8")), capfd)
    assert exported == []  # int8 made from the kept fp32 graph
    assert len(quantized) == 1
    assert log.count("kept from the unfinished export") == 1
    assert len(manifest.artifacts) == 2


def test_a_finished_artifact_changed_since_is_made_again(monkeypatch, tmp_path, capfd):
    out = tmp_path / "engines"
    opts = options(**TEXT, precisions=("fp32", "int8"))
    interrupted(monkeypatch, out, opts, name="write_report", call=1)
    graph = out / "onnx" / "int8" / "text_encoder.onnx"
    data = graph.read_bytes()
    graph.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, same mtime second: only the hash tells
    quantized = count_calls(monkeypatch, precision_module, "to_int8")
    _, manifest, exported, log = finish(monkeypatch, out, opts, capfd)
    assert exported == []  # the fp32 graph it derives from is kept (it verifies)
    assert len(quantized) == 1
    assert log.count("kept from the unfinished export") == 1
    assert graph.read_bytes() != data[:-1] + bytes([data[-1] ^ 1])


def test_task_checks_are_kept_only_for_the_same_artifacts(monkeypatch, tmp_path, capfd):
    out = tmp_path / "engines"
    opts = options(**TEXT, precisions=("fp32", "int8"), task_checks=True)
    interrupted(monkeypatch, out, opts, module=runner, name="task_agreement", call=2)  # fp32's check finished
    checks = count_calls(monkeypatch, runner, "task_agreement")
    result, manifest, exported, log = finish(monkeypatch, out, opts, capfd)
    assert exported == []
    assert [args[2] for args in checks] == ["int8"]  # fp32's verdict is kept
    assert "task checks fp32  kept from the unfinished export" in log
    assert {"task/fp32", "task/int8"} <= set(manifest.validation)
    assert [c.name for c in result.checks][-2:] == ["task/fp32", "task/int8"]

    # a check that ran on other files than this run's artifacts (an export made again with other bytes) runs again
    record = interrupted(monkeypatch, out, opts, module=runner, name="task_agreement", call=2)
    record["done"]["task/fp32"]["artifacts"]["onnx/fp32/text_encoder.onnx"] = "0" * 64
    (out / INCOMPLETE).write_text(json.dumps(record))
    checks = count_calls(monkeypatch, runner, "task_agreement")
    _, _, exported, log = finish(monkeypatch, out, opts, capfd)
    assert exported == []
    assert [args[2] for args in checks] == ["fp32", "int8"]


def test_the_optimized_copy_is_kept_with_its_graph(monkeypatch, tmp_path, capfd):
    out = tmp_path / "engines"
    opts = options(**TEXT, ort_optimize="always")
    record = interrupted(monkeypatch, out, opts, name="write_report", call=1)
    assert record["done"]["onnx/fp32/text_encoder.ort"]["dropped"] is False
    optimized = count_calls(monkeypatch, precision_module, "ort_optimize")
    _, manifest, exported, _ = finish(monkeypatch, out, opts, capfd)
    assert exported == [] and optimized == []
    assert [a.file for a in manifest.artifacts if a.variant == "ort-optimized"] == ["onnx/fp32/text_encoder.ort.onnx"]


# -- the journal on its own: what it trusts ---------------------------------------------------------------------------
def _journal_with_one_artifact(tmp_path, identity=None):
    from egovlp_deploy.export.journal import Journal
    from egovlp_deploy.export.manifest import ArtifactEntry
    from egovlp_deploy.export.validate import Check
    from egovlp_deploy.hashing import sha256_file

    out = tmp_path / "engines"
    graph = out / "onnx" / "fp32" / "text_encoder.onnx"
    graph.parent.mkdir(parents=True)
    graph.write_bytes(b"graph bytes")
    entry = ArtifactEntry(
        file="onnx/fp32/text_encoder.onnx",
        role="text_encoder",
        format="onnx",
        precision="fp32",
        sha256=sha256_file(graph),
        bytes=graph.stat().st_size,
        io={},
        external_data=[],
        validation={"passed": True},
    )
    journal = Journal.start(out, identity or {"id": 1}, set())
    journal.finished(
        "onnx/fp32/text_encoder",
        entry,
        Check("text_encoder/fp32", True, {"worst": {"min_cosine": 1.0, "max_rel": 0.0, "max_abs": 0.0}}),
    )
    return out, graph


def _reopened(out, identity=None):
    from egovlp_deploy.export.journal import Journal

    return Journal.start(out, identity or {"id": 1}, set())


def _kept(journal, graph):
    return journal.kept_artifact("onnx/fp32/text_encoder", graph, role="text_encoder", precision="fp32", io={})


def test_the_journal_keeps_a_verified_step(tmp_path):
    out, graph = _journal_with_one_artifact(tmp_path)
    entry, check = _kept(_reopened(out), graph)
    assert entry.file == "onnx/fp32/text_encoder.onnx" and check.passed


def _edit_record(out, change):
    record = json.loads((out / INCOMPLETE).read_text())
    step = record["done"]["onnx/fp32/text_encoder"]
    (out.parent / "outside.bin").write_bytes(b"x" * 10)
    if change == "not a dict":
        record["done"] = "done"
    elif change == "entry of another type":
        step["entry"] = 5
    elif change == "unknown entry field":
        step["entry"]["extra"] = 1
    elif change == "another file named":
        step["entry"]["file"] = "onnx/fp32/video_encoder.onnx"
    elif change == "another role recorded":
        step["entry"]["role"] = "video_encoder"
    elif change == "external data outside the folder":
        step["entry"]["external_data"] = [{"file": "../outside.bin", "bytes": 10, "sha256": "0" * 64}]
    elif change == "check of another type":
        step["check"] = {"name": 3}
    elif change == "passed as a string":
        step["check"]["passed"] = "false"
    elif change == "failures as a string":
        step["check"]["failures"] = "abc"
    elif change == "metrics not a dict":
        step["check"]["metrics"] = 5
    elif change == "io edited":
        step["entry"]["io"] = {"dynamic": {"batch": [1, 4096]}}
    elif change == "files not recorded":
        del step["files"]
    (out / INCOMPLETE).write_text(json.dumps(record))


@pytest.mark.parametrize(
    "change",
    [
        "not a dict",
        "entry of another type",
        "unknown entry field",
        "another file named",
        "another role recorded",
        "external data outside the folder",
        "check of another type",
        "passed as a string",
        "failures as a string",
        "metrics not a dict",
        "io edited",
        "files not recorded",
    ],
)
def test_a_damaged_or_hostile_journal_is_not_trusted(tmp_path, change):
    out, graph = _journal_with_one_artifact(tmp_path)
    _edit_record(out, change)
    assert _kept(_reopened(out), graph) is None


@pytest.mark.parametrize(
    "damage", ["appended", "same size", "removed", "the same bytes copied in", "a link to the same bytes"]
)
def test_a_changed_file_is_not_trusted(tmp_path, damage):
    """Only the file the earlier run wrote is kept: a folder copied or handed over from elsewhere (its journal
    and files crafted to hash as recorded) keeps nothing."""
    out, graph = _journal_with_one_artifact(tmp_path)
    if damage == "appended":
        graph.write_bytes(b"graph bytes!")
    elif damage == "same size":
        graph.write_bytes(b"graph bytez")
    elif damage == "removed":
        graph.unlink()
    elif damage == "the same bytes copied in":
        copy = graph.with_name("copy")
        copy.write_bytes(graph.read_bytes())
        copy.replace(graph)
    else:
        elsewhere = tmp_path / "elsewhere.onnx"
        elsewhere.write_bytes(graph.read_bytes())
        graph.unlink()
        graph.symlink_to(elsewhere)
    assert _kept(_reopened(out), graph) is None


def test_a_folder_copied_elsewhere_keeps_nothing(tmp_path):
    import shutil

    out, graph = _journal_with_one_artifact(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, copy_function=shutil.copy2)
    assert _kept(_reopened(copy), copy / "onnx" / "fp32" / "text_encoder.onnx") is None
    assert _kept(_reopened(out), graph) is not None


@pytest.mark.parametrize("part", ["checkpoint", "model_config", "settings", "tools", "cpu", "code"])
def test_each_part_of_the_identity_decides(tmp_path, part):
    from egovlp_deploy.export.journal import export_identity

    source = {"kind": "trainer", "path": "/a", "sha256": "1" * 64}
    args = dict(source=source, model_config_digest="c", settings={"opset": 20}, tools={"onnxruntime": "1.32.0"})
    identity = export_identity(**args)
    out, graph = _journal_with_one_artifact(tmp_path, identity)
    if part in ("code", "cpu"):
        other = {**identity, part: "another"}
    else:
        changed = {
            "checkpoint": {**source, "sha256": "2" * 64},
            "model_config": "d",
            "settings": {"opset": 18},
            "tools": {"onnxruntime": "1.31.0"},
        }
        key = "source" if part == "checkpoint" else "model_config_digest" if part == "model_config" else part
        other = export_identity(**{**args, key: changed[part]})
    assert other != identity
    journal = _reopened(out, other)
    assert "starting over" in journal.note and _kept(journal, graph) is None
    assert _kept(_reopened(out, other), graph) is None  # and the earlier run's steps are gone from the record


def test_the_code_digest_covers_the_exporter_and_the_model():
    from egovlp_deploy.export import journal

    names = journal.code_files()
    assert {
        "egovlp_deploy.export/runner.py",
        "egovlp_deploy.model/egovlp.py",
        "egovlp_deploy.kernels/divided_attention.py",
    } <= {f"{package}/{path.name}" for package, path in names}


# -- TensorRT engines built from the fp32 graph of an fp16-only export ------------------------------------------------
def fake_tensorrt(monkeypatch, sources):
    """TensorRT stand-ins (it does not install here): `build_engine` records the ONNX graph it was given (which
    must exist) and writes an engine file; the 'engine' runs the fp16 ONNX graph."""
    from egovlp_deploy.export import tensorrt

    def build_engine(onnx_path, engine_path, role, config, opts, progress=True):
        sources.append(onnx_path.read_bytes()[:0] or onnx_path)  # read: a missing graph raises here
        engine_path.write_bytes(b"engine of " + onnx_path.name.encode())
        return {"build_seconds": 0.0}

    def run_engine(engine_path, role):
        return runner._ort_run(engine_path.parents[2] / "onnx" / "fp16" / f"{role}.onnx")

    monkeypatch.setattr(tensorrt, "import_tensorrt", lambda: None)
    monkeypatch.setattr(tensorrt, "build_engine", build_engine)
    monkeypatch.setattr(tensorrt, "run_engine", run_engine)


def test_engines_of_an_fp16_export_are_built_from_an_fp32_graph_that_exists(monkeypatch, tmp_path, capfd):
    """Without --trt-strongly-typed the engines are built from the fp32 graph. With only fp16 asked for, that graph
    was deleted as soon as the fp16 one was made, before the engines were built."""
    out, sources = tmp_path / "engines", []
    fake_tensorrt(monkeypatch, sources)
    opts = options(**TEXT, formats=("onnx", "tensorrt"), precisions=("fp16",))
    result, manifest, exported, _ = finish(monkeypatch, out, opts, capfd)
    assert sources == [out / "onnx" / "fp32" / "text_encoder.onnx"]
    assert sorted(a.file for a in manifest.artifacts) == [
        "onnx/fp16/text_encoder.onnx",
        "tensorrt/fp16/text_encoder.engine",
    ]
    assert not (out / "onnx" / "fp32" / "text_encoder.onnx").exists(), "the fp32 source is no artifact: removed after"

    # an interrupted run's engine is kept only when its source graph is the same
    record = interrupted(monkeypatch, out, opts, name="write_report", call=1)
    assert "tensorrt/fp16/text_encoder" in record["done"]
    sources.clear()
    finish(monkeypatch, out, opts, capfd)
    assert sources == []


# -- a resumed export equals an uninterrupted one -------------------------------------------------------------------
def _comparable(out):
    """The manifest's artifacts (without timings) and the validation report of an export folder."""
    manifest = json.loads((out / "manifest.json").read_text())
    artifacts = [
        {
            **{k: v for k, v in a.items() if k != "export_seconds"},
            "validation": {k: v for k, v in a["validation"].items() if "ms" not in k},
        }
        for a in manifest["artifacts"]
    ]
    return artifacts, manifest["validation"], json.loads((out / "validation.json").read_text())


@pytest.mark.parametrize("stop", [("validate_artifact", 2)])
def test_a_resumed_export_writes_what_an_uninterrupted_one_writes(monkeypatch, tmp_path, capfd, stop):
    opts = options(**TEXT, precisions=("fp32", "int8"), ort_optimize="always", task_checks=True)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    finish(monkeypatch, whole, opts, capfd)
    interrupted(monkeypatch, resumed, opts, name=stop[0], call=stop[1])
    _, _, _, log = finish(monkeypatch, resumed, opts, capfd)
    assert "[6/6] manifest.json" in log
    assert _comparable(resumed) == _comparable(whole)
    assert (resumed / "validation.md").read_text() == (whole / "validation.md").read_text()


def test_a_kept_failed_check_still_fails_the_export(monkeypatch, tmp_path, capfd):
    out = tmp_path / "engines"
    opts = options(**TEXT, precisions=("fp32", "int8"))
    real = runner.validate_artifact

    def failing_int8(model, role, run, precision, sizes):
        check = real(model, role, run, precision, sizes)
        if precision == "int8":
            check.passed, check.failures = False, ["int8 text encoder: cosine below the bound (forced)"]
        return check

    with monkeypatch.context() as m:
        m.setattr(runner, "validate_artifact", failing_int8)
        interrupted(m, out, opts, name="write_report", call=1)
    result = run_export("random:tiny", out, opts, quiet=True)
    assert not result.passed
    assert "cosine below the bound (forced)" in (out / "validation.md").read_text()
    assert json.loads((out / "manifest.json").read_text())["validation"]["passed"] is False


# Options outside the identity's settings: those that choose which steps run or how the run reports, --frames (in
# the model config's digest) and the task checks' inputs (in each task check's record). Every other option is a
# setting (a new option fails this test until it is placed).
NOT_IDENTITY = {"formats", "precisions", "roles", "frames", "allow_mismatch", "egomcq", "video_root", "tokenizer"}
NOT_IDENTITY |= {"max_questions", "task_checks"}


def test_every_export_option_is_placed_in_or_out_of_the_identity():
    from dataclasses import fields

    settings = runner._identity_settings(ExportOptions())
    assert {f.name for f in fields(ExportOptions)} - NOT_IDENTITY == set(settings)


def test_a_program_an_interrupted_run_finished_is_kept(monkeypatch, tmp_path, capfd):
    from egovlp_deploy.export import program

    out = tmp_path / "engines"
    opts = options(**TEXT, formats=("program",))
    interrupted(monkeypatch, out, opts, name="write_report", call=1)
    made = count_calls(monkeypatch, program, "export_program")
    _, manifest, _, log = finish(monkeypatch, out, opts, capfd)
    assert made == []
    assert "program fp32 text_encoder" in log and log.count("kept from the unfinished export") == 1
    assert [(a.file, a.format) for a in manifest.artifacts] == [
        ("program/cpu_fp32/text_encoder.safetensors", "program")
    ]
