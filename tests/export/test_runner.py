import json
from pathlib import Path

import pytest
import torch

from egovlp_deploy import EgoVLPv2, EgoVLPv2Config
from egovlp_deploy.cli import main
from egovlp_deploy.model.factory import load_model
from official_format import randomize_, write_official_checkpoint


def test_loads_trainer_step_dirs_and_run_dirs(tmp_path, tiny_model, monkeypatch):
    """A run dir (its newest valid checkpoint) and a step dir load verified, each of their files read once: the
    verification hashes them, and the source hash (every weight and config file) reuses the manifest's hashes."""
    from egovlp_deploy import checkpoint, hashing
    from egovlp_deploy.trainer.training_state import save_checkpoint

    step = save_checkpoint(tmp_path / "run" / "checkpoints", 5, tiny_model, {"step": 5}, {"x": 1})
    expected, real = hashing.sha256_tree(step), hashing.sha256_file
    reads = []

    def counted(path, offset=0):
        reads.append(Path(path).name)
        return real(path, offset)

    monkeypatch.setattr(checkpoint, "sha256_file", counted)
    monkeypatch.setattr(hashing, "sha256_file", counted)
    for path in (step, tmp_path / "run"):
        reads.clear()
        model, source = load_model(str(path))
        assert source["kind"] == "trainer" and source["path"].endswith("step_00000005")
        assert source["sha256"] == expected
        assert sorted(reads) == sorted(p.name for p in step.iterdir())  # MANIFEST.json by the source hash only
        torch.testing.assert_close(model.state_dict()["cls_token"], tiny_model.state_dict()["cls_token"])
    (step / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(ValueError, match="truncated|checksum"):
        load_model(str(step))
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "nothing"))


def test_export_from_an_official_checkpoint(tmp_path):
    model = randomize_(EgoVLPv2(EgoVLPv2Config.tiny()), seed=3)
    pth = tmp_path / "EgoVLPv2.pth"
    write_official_checkpoint(model.state_dict(), pth, model.config.text.max_position_embeddings)
    out = tmp_path / "out"
    code = main(
        [
            "export",
            "--checkpoint",
            str(pth),
            "--out",
            str(out),
            "--roles",
            "text_encoder",
            "--max-text-len",
            "16",
            "--ort-optimize",
            "never",
            "--quiet",
        ]
    )
    assert code == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["source_checkpoint"]["kind"] == "official" and m["validation"]["passed"]


def test_mismatch_fails_the_command_unless_allowed(tmp_path, tiny_trained_like, monkeypatch, capsys):
    from egovlp_deploy.export import validate

    monkeypatch.setitem(validate.THRESHOLDS, "fp32", {**validate.THRESHOLDS["fp32"], "max_rel": 0.0})
    ckpt, _ = tiny_trained_like
    args = [
        "export",
        "--checkpoint",
        str(ckpt),
        "--roles",
        "text_encoder",
        "--max-text-len",
        "16",
        "--ort-optimize",
        "never",
    ]
    assert main(args + ["--out", str(tmp_path / "a")]) == 1
    assert "VALIDATION FAILED" in capsys.readouterr().out
    assert "FAILED" in (tmp_path / "a" / "validation.md").read_text()
    assert not json.loads((tmp_path / "a" / "manifest.json").read_text())["validation"]["passed"]


def test_allow_mismatch_turns_the_failure_into_exit_0(tmp_path, monkeypatch):
    from egovlp_deploy.export import runner as pipeline
    from egovlp_deploy.export.manifest import Manifest

    failed = pipeline.ExportResult(tmp_path, False, manifest=Manifest({}, {}, {}))
    monkeypatch.setattr(pipeline, "run_export", lambda *a, **k: failed)
    args = ["export", "--checkpoint", "random:tiny", "--out", str(tmp_path), "--quiet"]
    assert main(args) == 1
    assert main(args + ["--allow-mismatch"]) == 0


def test_paper_size_video_encoder_exports_and_matches(tmp_path):
    """The paper model (random weights, ViT-B/16 + 4096 projection): its video encoder exports and validates.
    One frame keeps the test's compute a quarter of the 4-frame graph (4 frames: 230 s on the loaded 2-core
    machine); the graph is the same code for any frame count."""
    out = tmp_path / "base"
    code = main(
        [
            "export",
            "--checkpoint",
            "random:base",
            "--frames",
            "1",
            "--out",
            str(out),
            "--roles",
            "video_encoder",
            "--max-batch",
            "2",
            "--ort-optimize",
            "never",
            "--quiet",
        ]
    )
    assert code == 0, (out / "validation.md").read_text()
    entry = json.loads((out / "manifest.json").read_text())["artifacts"][0]
    assert entry["validation"]["min_cosine"] >= 0.99999 and entry["validation"]["max_rel"] <= 1e-4


def test_bad_options_are_clear_errors(tmp_path, capsys):
    assert main(["export", "--checkpoint", "random:tiny", "--out", str(tmp_path), "--format", "tflite"]) == 2
    assert "unknown format" in capsys.readouterr().err
    assert main(["export", "--checkpoint", "random:huge", "--out", str(tmp_path)]) == 2
