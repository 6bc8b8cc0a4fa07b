import json
import re

import pytest

from egovlp_deploy.export.manifest import (
    ArtifactError,
    ManifestError,
    check_tool_versions,
    load_manifest,
    open_artifact,
)


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


# -- paths confined to the folder, external data hashed (no export needed: hand-made files) -----------------------
def _tiny_graph(role="video_encoder", precision="fp32"):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from egovlp_deploy.export.onnx_export import set_metadata

    w = numpy_helper.from_array(np.arange(1024, dtype=np.float32).reshape(32, 32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [w],
    )
    model = helper.make_model(graph)
    set_metadata(model, {"egovlp.role": role, "egovlp.precision": precision})
    return model


def test_inside_refuses_paths_leaving_the_folder(tmp_path):
    from egovlp_deploy.export.manifest import inside

    folder = tmp_path / "engines"
    (folder / "onnx").mkdir(parents=True)
    (tmp_path / "outside.onnx").write_bytes(b"x")
    assert inside(folder, "onnx/a.onnx", "k") == folder / "onnx" / "a.onnx"
    for name, why in [
        ("/etc/passwd", "is absolute"),
        ("C:\\x.onnx", "is absolute"),
        ("\\\\host\\x", "absolute"),
        ("onnx/../../outside.onnx", "contains '..'"),
        ("..\\outside.onnx", "contains '..'"),
        ("", "not a path"),
        (3, "not a path"),
        (None, "not a path"),
        (".", "the folder itself"),
    ]:
        with pytest.raises(ManifestError, match=f"manifest key k {re.escape(repr(name))} .*{re.escape(why)}"):
            inside(folder, name, "manifest key k")
    (folder / "onnx" / "out.onnx").symlink_to(tmp_path / "outside.onnx")
    with pytest.raises(ManifestError, match="resolves to .*outside.onnx, outside the folder"):
        inside(folder, "onnx/out.onnx", "k")
    (folder / "onnx" / "in.onnx").symlink_to(folder / "onnx" / "a.onnx")  # a link that stays inside is fine
    assert inside(folder, "onnx/in.onnx", "k") == folder / "onnx" / "in.onnx"
    with pytest.raises(ArtifactError, match="k 'out.onnx' resolves to .*outside the folder"):  # relative to base
        inside(folder, "out.onnx", "k", base=folder / "onnx", error=ArtifactError)


def test_add_records_external_data_and_verify_checks_it(tmp_path):
    import onnx

    from egovlp_deploy.export.manifest import Manifest, sha256_file, verify_artifact

    out = tmp_path / "out"
    (out / "onnx").mkdir(parents=True)
    onnx.save_model(_tiny_graph(), str(out / "onnx" / "inline.onnx"))
    onnx.save_model(
        _tiny_graph(),
        str(out / "onnx" / "split.onnx"),
        save_as_external_data=True,
        location="split.onnx.data",
        size_threshold=0,
    )
    data = out / "onnx" / "split.onnx.data"
    m = Manifest(source_checkpoint={}, model_config={}, export={})
    kw = dict(role="video_encoder", format="onnx", precision="fp32", io={"inputs": [], "outputs": []})
    assert m.add(out, out / "onnx" / "inline.onnx", **kw).external_data == []
    entry = m.add(out, out / "onnx" / "split.onnx", **kw)
    assert entry.external_data == [{"file": "onnx/split.onnx.data", "bytes": 4096, "sha256": sha256_file(data)}]
    m.save(out)
    assert load_manifest(out).artifacts[1].external_data == entry.external_data  # survives the JSON round trip
    assert verify_artifact(out, entry) == out / "onnx" / "split.onnx"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="split.onnx.data: sha256 differs"):
        verify_artifact(out, entry)


def test_add_refuses_external_data_outside_the_folder(tmp_path):
    import onnx

    from egovlp_deploy.export.manifest import Manifest

    out = tmp_path / "out"
    (out / "onnx").mkdir(parents=True)
    path = out / "onnx" / "split.onnx"
    onnx.save_model(_tiny_graph(), str(path), save_as_external_data=True, location="w.data", size_threshold=0)
    proto = onnx.load(str(path), load_external_data=False)
    next(kv for kv in proto.graph.initializer[0].external_data if kv.key == "location").value = "../../w.data"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ManifestError, match="split.onnx: external data location '../../w.data' contains '..'"):
        Manifest(source_checkpoint={}, model_config={}, export={}).add(
            out, path, role="video_encoder", format="onnx", precision="fp32", io={}
        )


def test_copied_tokenizer_is_the_only_content_of_its_folder(tmp_path):
    from egovlp_deploy.export.manifest import copy_tokenizer, verify_tokenizer

    source, out = tmp_path / "run_tokenizer", tmp_path / "out"
    source.mkdir()
    (source / "tokenizer.json").write_text("{}")
    (source / "tokenizer_config.json").write_text("{}")
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "vocab.json").write_text("{}")  # an earlier export's file: the loader would read it
    entry = copy_tokenizer(source, out, ours={"vocab.json", "tokenizer.json"})
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert verify_tokenizer(out, entry) == out / "tokenizer"
    (out / "tokenizer" / "special_tokens_map.json").write_text("{}")
    with pytest.raises(ArtifactError, match="special_tokens_map.json: in the tokenizer folder but not listed"):
        verify_tokenizer(out, entry)


def test_copy_tokenizer_never_replaces_or_removes_files_it_did_not_write(tmp_path):
    """Files no earlier export listed (a user's notes, a user's vocab.json of the same name as one copied) are
    refused before anything is written."""
    from egovlp_deploy.export.manifest import copy_tokenizer

    source, out = tmp_path / "run_tokenizer", tmp_path / "out"
    source.mkdir()
    (source / "vocab.json").write_text("{}")
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "notes.txt").write_text("notes")
    (out / "tokenizer" / "vocab.json").write_text("keep")
    for ours in ((), {"vocab.json"}):
        with pytest.raises(ManifestError, match="holds .*notes.txt.*which no earlier export of this folder wrote"):
            copy_tokenizer(source, out, ours=ours)
    assert (out / "tokenizer" / "notes.txt").read_text() == "notes"
    assert (out / "tokenizer" / "vocab.json").read_text() == "keep"
