"""The exporter and the engines loader as a careless user meets them: options that cannot be served given to a
re-export of a working folder, a format that builds none of the roles asked for, a manifest whose model config was
edited, and an export killed (SIGKILL) between writing a file and renaming it."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from egovlp_deploy.cli import main
from egovlp_deploy.export.manifest import INCOMPLETE, MANIFEST, load_manifest
from egovlp_deploy.export.runner import ExportOptions, run_export
from egovlp_deploy.runtime.engines import EngineError, Runtime
from egovlp_deploy.tokenizer import train_demo_tokenizer
from official_format import saved_random_tiny

FAST = dict(roles=("text_encoder",), max_text_len=16, task_checks=False, ort_optimize="never")


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def wild(tmp_path_factory):
    """A saved tiny model, a tokenizer and an export of the model's text encoder."""
    root = tmp_path_factory.mktemp("wild")
    saved_random_tiny(root / "ckpt", seed=9)
    train_demo_tokenizer(root / "tok")
    out = root / "engines"
    result = run_export(str(root / "ckpt"), out, ExportOptions(**FAST), quiet=True)
    assert result.passed, result.errors
    return root


@pytest.fixture
def engines_copy(wild, tmp_path):
    dst = tmp_path / "engines"
    shutil.copytree(wild / "engines", dst)
    return dst


# -- a re-export whose options cannot be served leaves the working folder as it was ------------------------------
def _refused_cases(wild, tmp_path):
    bad_questions = tmp_path / "questions.json"
    bad_questions.write_text("[]")  # not the EgoMCQ layout (an object keyed "0", "1", ...)
    videos = tmp_path / "videos"
    videos.mkdir()
    tok = str(wild / "tok")
    return {
        "max-batch 1": (["--max-batch", "1"], "--max-batch 1: must be at least 2"),
        "max-batch 0": (["--max-batch", "0"], "--max-batch 0: must be at least 2"),
        "max-text-len 2": (["--max-text-len", "2"], "--max-text-len 2: must be at least 3"),
        "max-questions 0": (["--max-questions", "0"], "--max-questions 0: must be at least 1"),
        "missing questions": (
            ["--egomcq", str(tmp_path / "nope.json"), "--video-root", str(videos), "--tokenizer", tok],
            "--egomcq " + str(tmp_path / "nope.json") + ": no such file",
        ),
        "malformed questions": (
            ["--egomcq", str(bad_questions), "--video-root", str(videos), "--tokenizer", tok],
            "expected an object keyed '0', '1'",
        ),
        "missing tokenizer": (["--tokenizer", str(tmp_path / "none")], "--tokenizer " + str(tmp_path / "none")),
        "aoti of fusion only": (["--format", "aoti", "--roles", "fusion"], "--format aoti builds"),
        "program of fusion only": (["--format", "program", "--roles", "fusion"], "--format program builds"),
        "no role": (["--roles", ","], "no role to export"),
    }


CASES = [
    "max-batch 1",
    "max-batch 0",
    "max-text-len 2",
    "max-questions 0",
    "missing questions",
    "malformed questions",
    "missing tokenizer",
    "aoti of fusion only",
    "program of fusion only",
    "no role",
]


@pytest.mark.parametrize("case", CASES)
def test_a_reexport_with_options_it_cannot_serve_leaves_the_folder_working(wild, engines_copy, tmp_path, capsys, case):
    extra, message = _refused_cases(wild, tmp_path)[case]
    before = _tree(engines_copy)
    argv = ["export", "--checkpoint", str(wild / "ckpt"), "--out", str(engines_copy), "--quiet"]
    argv += ["--roles", "text_encoder", "--max-text-len", "16", "--ort-optimize", "never", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert _tree(engines_copy) == before  # the manifest was not retired: the folder still serves queries
    assert not (engines_copy / INCOMPLETE).exists()
    Runtime(engines_copy).runner("text_encoder")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("fmt", ["program", "aoti"])
def test_a_cuda_build_without_cuda_is_one_line_before_anything_is_written(wild, engines_copy, capsys, fmt):
    before = _tree(engines_copy)
    argv = ["export", "--checkpoint", str(wild / "ckpt"), "--out", str(engines_copy), "--quiet"]
    assert main(argv + ["--roles", "text_encoder", "--format", fmt, "--torch-device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("egovlp-deploy export: error: --torch-device cuda: this torch") and "no CUDA device" in err
    assert _tree(engines_copy) == before


# -- a manifest whose model config does not describe the graphs ---------------------------------------------------
def _edit_manifest(folder, edit):
    m = json.loads((folder / MANIFEST).read_text())
    edit(m)
    (folder / MANIFEST).write_text(json.dumps(m, indent=2))


@pytest.mark.parametrize(
    "key, value",
    [("pad_token_id", 3), ("vocab_size", 5000), ("max_position_embeddings", 40)],
)
def test_an_edited_model_config_is_refused_at_load(engines_copy, key, value):
    # The runtime pads queries with pad_token_id and checks token ids against vocab_size from the manifest's config;
    # an edit that leaves every shape alone ran the graph with the wrong padding or checks, silently.
    _edit_manifest(engines_copy, lambda m: m["model_config"]["text"].__setitem__(key, value))
    with pytest.raises(EngineError, match="exported from another model config than the manifest's model_config"):
        Runtime(engines_copy).runner("text_encoder")


def test_a_graph_exported_before_later_config_fields_still_loads(engines_copy):
    """A manifest written before a config field existed lacks it, and its graphs' digest is of that config: the
    digest is compared with the manifest's model_config as stored, not with the config completed by defaults."""
    import onnx

    from egovlp_deploy.hashing import sha256_file

    m = json.loads((engines_copy / MANIFEST).read_text())
    del m["model_config"]["cross_gate_init"], m["model_config"]["video"]["temporal_embed_std"]
    old_digest = hashlib.sha256(json.dumps(m["model_config"], indent=2, sort_keys=True).encode()).hexdigest()[:16]
    entry = m["artifacts"][0]
    graph = engines_copy / entry["file"]
    proto = onnx.load(str(graph))
    for prop in proto.metadata_props:
        if prop.key == "egovlp.config_sha256":
            prop.value = old_digest
    onnx.save_model(proto, str(graph))
    entry["sha256"], entry["bytes"] = sha256_file(graph), graph.stat().st_size
    (engines_copy / MANIFEST).write_text(json.dumps(m, indent=2))
    Runtime(engines_copy).runner("text_encoder")


# -- an export killed between writing a file and renaming it ------------------------------------------------------
KILL_AT_RENAME = textwrap.dedent(
    """
    import os, signal, sys
    from egovlp_deploy.export.runner import ExportOptions, run_export
    real = os.replace
    def replace(src, dst):
        if str(dst).endswith(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)  # the temp file is complete, the rename never happens
        return real(src, dst)
    os.replace = replace
    run_export(sys.argv[1], sys.argv[2], ExportOptions(roles=("text_encoder",), precisions=("fp32", "int8"),
               max_text_len=16, task_checks=False, ort_optimize="always"), quiet=True)
    """
)


@pytest.mark.parametrize("stage", ["text_encoder.onnx", "text_encoder.ort.onnx", "validation.json"])
def test_temp_files_of_a_killed_export_are_removed_by_the_rerun(wild, engines_copy, stage):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.run(
        [sys.executable, "-c", KILL_AT_RENAME, str(wild / "ckpt"), str(engines_copy), stage],
        env=env,
        capture_output=True,
        timeout=600,
    )
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    hidden = [p for p in engines_copy.rglob(".*") if p.is_file()]
    assert hidden, "the kill left no temp file: the test reproduces nothing"
    result = run_export(str(wild / "ckpt"), engines_copy, ExportOptions(**FAST), quiet=True)
    assert result.passed, result.errors
    assert [p for p in engines_copy.rglob(".*") if p.is_file()] == []
    Runtime(engines_copy).runner("text_encoder")


def test_only_the_exporters_own_temp_names_are_removed(engines_copy):
    from egovlp_deploy.export.runner import remove_stale_temp_files

    ours = [
        "onnx/fp32/.text_encoder.onnx.tmp4242",
        "onnx/int8/.fusion.onnx.q17",
        "onnx/fp32/.video_encoder.ort.onnx.o9",
        "aoti/cpu_fp32/.fusion_head.tmp77.pt2",
        "program/cpu_fp32/.text_encoder.safetensors.ab_cd123.tmp",
        "tensorrt/fp16/.fusion.engine.tmp5",
        "tensorrt/.timing.cache.tmp5",
        ".manifest.json.x1y2z3w4.tmp",
        "tokenizer/.vocab.json.tmp",
    ]
    theirs = [
        ".my_notes.tmp",
        "onnx/fp32/.my_model.onnx.tmp1",
        "onnx/fp32/text_encoder.onnx.tmp1",  # not hidden: no writer of ours names a file so
        "tokenizer/.merges.txt.tmp",  # a tokenizer file no export of this folder wrote
        "other/.text_encoder.onnx.tmp1",
    ]
    for name in ours + theirs:
        (engines_copy / name).parent.mkdir(parents=True, exist_ok=True)
        (engines_copy / name).write_text("x")
    removed = remove_stale_temp_files(engines_copy, {"vocab.json"})
    assert sorted(str(p.relative_to(engines_copy)) for p in removed) == sorted(ours)
    assert all((engines_copy / name).read_text() == "x" for name in theirs)
    assert load_manifest(engines_copy).artifacts  # the export itself untouched


def test_a_first_export_killed_in_its_first_write_can_be_rerun(wild, tmp_path):
    """Killed while it wrote its first file into a new folder (the export-incomplete record), an export leaves only
    that write's temp file: the rerun takes the folder as its own (as good as empty), removes the file and exports."""
    out = tmp_path / "engines"
    out.mkdir()
    (out / ".export-incomplete.json.k1ll3d00.tmp").write_bytes(b'{"tokenizer_fi')
    result = run_export(str(wild / "ckpt"), out, ExportOptions(**FAST), quiet=True)
    assert result.passed, result.errors
    assert not (out / ".export-incomplete.json.k1ll3d00.tmp").exists() and (out / "manifest.json").is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / ".notes.tmp").write_text("not the exporter's")
    with pytest.raises(ValueError, match="not empty and not an egovlp-deploy export folder"):
        run_export(str(wild / "ckpt"), mine, ExportOptions(**FAST), quiet=True)
