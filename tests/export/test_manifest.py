import json

import pytest

from egovlp_deploy.export.manifest import (ArtifactError, ManifestError, check_tool_versions, load_manifest,
                                           open_artifact)


def test_manifest_lists_every_artifact(tiny_export):
    out, _, _ = tiny_export
    m = load_manifest(out)
    assert m.source_checkpoint["kind"] == "pretrained" and len(m.source_checkpoint["sha256"]) == 64
    assert m.tools["torch"] and m.tools["onnxruntime"]
    roles = {(a.role, a.precision) for a in m.artifacts if a.variant == ""}
    assert len(roles) == 15
    v = m.find("video_encoder")
    assert v.io["inputs"][0] == {"name": "video", "shape": ["batch", 4, 3, 32, 32], "dtype": "float32"}
    assert v.io["dynamic"] == {"batch": [1, 8]} and v.opset >= 18 and v.validation["passed"]
    assert m.find("fusion_head", "fp16").io["inputs"][0]["dtype"] == "float16"
    assert m.validation["passed"]


def test_corrupted_artifact_is_refused(export_copy):
    path = export_copy / "onnx" / "fp32" / "text_encoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 differs"):
        open_artifact(export_copy, "text_encoder")
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(ArtifactError, match="truncated"):
        open_artifact(export_copy, "text_encoder")
    path.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        open_artifact(export_copy, "text_encoder")


def test_swapped_files_are_refused_even_with_a_matching_hash(export_copy):
    """A manifest edited to point one role at another role's file: the hash matches, the role inside does not."""
    m = json.loads((export_copy / "manifest.json").read_text())
    video = next(a for a in m["artifacts"] if a["role"] == "video_encoder" and a["precision"] == "fp32")
    text = next(a for a in m["artifacts"] if a["role"] == "text_encoder" and a["precision"] == "fp32")
    text.update(file=video["file"], sha256=video["sha256"], bytes=video["bytes"])
    (export_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="'video_encoder' graph but the manifest lists it as 'text_encoder'"):
        open_artifact(export_copy, "text_encoder")


def test_wrong_or_broken_manifest(export_copy, tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        load_manifest(tmp_path)
    path = export_copy / "manifest.json"
    m = json.loads(path.read_text())
    path.write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(ManifestError, match="format_version 99"):
        load_manifest(export_copy)
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(export_copy)
    path.write_text(json.dumps({**m, "artifacts": [{"file": "x"}]}))
    with pytest.raises(ManifestError, match="malformed"):
        load_manifest(export_copy)
    path.write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="no onnx fp32 artifact for role 'video_encoder'"):
        m2 = load_manifest(export_copy)
        m2.artifacts = [a for a in m2.artifacts if a.role != "video_encoder"]
        m2.find("video_encoder")


def test_tool_version_mismatch_is_refused(tiny_export):
    out, _, _ = tiny_export
    entry = load_manifest(out).find("fusion_head")
    entry.format = "aoti"
    with pytest.raises(ArtifactError, match="built with torch 0.0"):
        check_tool_versions(entry, manifest_tools={"torch": "0.0"})
    entry.format = "tensorrt"
    with pytest.raises(ArtifactError, match="TensorRT 9.0"):
        check_tool_versions(entry, tools={"tensorrt": None}, manifest_tools={"tensorrt": "9.0"})
