"""Engine folder integrity: every path the manifest names stays inside the folder (no absolute paths, no `..`, no
symlinks out), and every byte an artifact depends on (ONNX external data, tokenizer files) is hashed in the
manifest and checked at load. The crafted folders are copies of the session's export, edited here."""

import json
import re
import shutil
from dataclasses import asdict

import numpy as np
import pytest

from egovlp_deploy.export import manifest as manifest_module
from egovlp_deploy.export.manifest import ArtifactError, ManifestError, copy_tokenizer, load_manifest, verify_artifact
from egovlp_deploy.runtime import EngineError, Runtime

TEXT = "onnx/fp32/text_encoder.onnx"


def _edit_manifest(folder, edit):
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def _text_entry(m):
    return next(a for a in m["artifacts"] if a["file"] == TEXT)


def _outside(tmp_path, name):
    """A place beside the engines copy, outside its folder."""
    (tmp_path / "outside").mkdir(exist_ok=True)
    return tmp_path / "outside" / name


def _externalize(folder, file=TEXT):
    """Re-save one ONNX artifact with its weights in an external data file beside it (`<name>.data`) and update
    its manifest entry the way the exporter records an artifact (Manifest.add). Only float weights move out: ONNX
    Runtime's shape inference needs the small integer constants (axes, shapes) inside the graph."""
    import onnx
    from onnx.external_data_helper import set_external_data

    path = folder / file
    proto = onnx.load(str(path))
    for init in proto.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.raw_data) >= 1024:
            set_external_data(init, location=f"{path.name}.data")
    onnx.save_model(proto, str(path))  # writes the marked tensors to the data file
    m = load_manifest(folder)
    old = next(a for a in m.artifacts if a.file == file)
    kept = {k: v for k, v in asdict(old).items() if k not in ("file", "sha256", "bytes", "external_data")}
    m.add(folder, path, **kept)
    m.save(folder)
    return path.with_name(f"{path.name}.data")


def _text_outputs(folder):
    rt = Runtime(folder)
    return rt.runner("text_encoder")(**rt.example("text_encoder"))


# -- every path confined to the folder --------------------------------------------------------------------------
def test_absolute_artifact_path_is_refused(engines_copy, tmp_path):
    target = _outside(tmp_path, "text_encoder.onnx")
    shutil.move(engines_copy / TEXT, target)
    _edit_manifest(engines_copy, lambda m: _text_entry(m).update(file=str(target)))
    with pytest.raises(EngineError, match=r"artifacts\[text_encoder/onnx/fp32\]\.file .*absolute"):
        Runtime(engines_copy).runner("text_encoder")


def test_dotdot_artifact_path_is_refused(engines_copy, tmp_path):
    shutil.move(engines_copy / TEXT, _outside(tmp_path, "text_encoder.onnx"))
    _edit_manifest(engines_copy, lambda m: _text_entry(m).update(file="onnx/../../outside/text_encoder.onnx"))
    with pytest.raises(EngineError, match=r"artifacts\[text_encoder/onnx/fp32\]\.file .*'\.\.'"):
        Runtime(engines_copy).runner("text_encoder")


def test_symlinks_out_of_the_folder_are_refused(engines_copy, tmp_path):
    """The manifest is untouched and the bytes match: only where the path leads is wrong."""
    artifact = engines_copy / TEXT
    shutil.move(artifact, _outside(tmp_path, "text_encoder.onnx"))
    artifact.symlink_to(_outside(tmp_path, "text_encoder.onnx"))
    with pytest.raises(EngineError, match=r"artifacts\[text_encoder/onnx/fp32\]\.file .*outside the folder"):
        Runtime(engines_copy).runner("text_encoder")
    artifact.unlink()
    shutil.move(engines_copy / "onnx" / "fp32", _outside(tmp_path, "fp32"))  # a linked folder on the way
    (engines_copy / "onnx" / "fp32").symlink_to(_outside(tmp_path, "fp32"))
    with pytest.raises(EngineError, match="outside the folder"):
        Runtime(engines_copy).runner("video_encoder")


def test_symlinks_inside_the_folder_load(engines_copy):
    shutil.move(engines_copy / "onnx" / "fp32", engines_copy / "real_fp32")
    (engines_copy / "onnx" / "fp32").symlink_to(engines_copy / "real_fp32")
    assert Runtime(engines_copy).runner("text_encoder").path.name == "text_encoder.onnx"


@pytest.mark.parametrize(
    "key, edit",
    [
        ("artifacts[text_encoder/onnx/fp32].derived_from", lambda m: _text_entry(m).update(derived_from="/etc/passwd")),
        ("tokenizer.dir", lambda m: m.update(tokenizer={"dir": "../tok", "files": {}})),
        ("tokenizer.files", lambda m: m.update(tokenizer={"dir": "tokenizer", "files": {"../../x.json": "0" * 64}})),
        (
            "artifacts[text_encoder/onnx/fp32].external_data[0].file",
            lambda m: _text_entry(m).update(external_data=[{"file": "/tmp/w.bin", "bytes": 1, "sha256": "0" * 64}]),
        ),
    ],
)
def test_every_manifest_path_is_confined(engines_copy, key, edit):
    _edit_manifest(engines_copy, edit)
    with pytest.raises(ManifestError, match=re.escape(f"manifest key {key} ")):
        load_manifest(engines_copy)
    with pytest.raises(EngineError, match="outside|absolute|'\\.\\.'"):
        Runtime(engines_copy)


def _record_tokenizer(folder):
    """The folder's tokenizer hashed into its manifest, as the exporter records a copied tokenizer."""
    entry = copy_tokenizer(folder / "tokenizer", folder)
    _edit_manifest(folder, lambda m: m.update(tokenizer=entry))


def test_tokenizer_symlinked_out_is_refused(engines_copy, tmp_path):
    _record_tokenizer(engines_copy)
    shutil.move(engines_copy / "tokenizer", _outside(tmp_path, "tokenizer"))
    (engines_copy / "tokenizer").symlink_to(_outside(tmp_path, "tokenizer"))
    with pytest.raises(EngineError, match="tokenizer.dir 'tokenizer' .*outside the folder"):
        Runtime(engines_copy).text_encoder.encode(["#C C opens the box"])
    (engines_copy / "tokenizer").unlink()
    shutil.copytree(_outside(tmp_path, "tokenizer"), engines_copy / "tokenizer")
    file = engines_copy / "tokenizer" / "tokenizer.json"
    file.unlink()
    file.symlink_to(_outside(tmp_path, "tokenizer") / "tokenizer.json")  # same bytes, outside
    with pytest.raises(EngineError, match="tokenizer.files 'tokenizer.json' .*outside the folder"):
        Runtime(engines_copy).text_encoder.encode(["#C C opens the box"])


def test_tokenizer_file_not_in_the_manifest_is_refused(engines_copy):
    """The tokenizer loader reads every file of its folder it knows: one the manifest does not list is unchecked."""
    _record_tokenizer(engines_copy)
    Runtime(engines_copy).text_encoder.encode(["#C C opens the box"])
    (engines_copy / "tokenizer" / "added_tokens.json").write_text(json.dumps({"opens": 7}))
    with pytest.raises(EngineError, match="added_tokens.json: in the tokenizer folder but not listed"):
        Runtime(engines_copy).text_encoder.encode(["#C C opens the box"])


def test_unrecorded_tokenizer_folder_symlinked_out_is_refused(engines_copy, tmp_path):
    """An export without a tokenizer record falls back to ENGINES/tokenizer; that one must be inside too."""
    assert not load_manifest(engines_copy).tokenizer
    shutil.move(engines_copy / "tokenizer", _outside(tmp_path, "tokenizer"))
    (engines_copy / "tokenizer").symlink_to(_outside(tmp_path, "tokenizer"))
    with pytest.raises(EngineError, match="outside the folder"):
        Runtime(engines_copy).text_encoder.encode(["#C C opens the box"])


# -- ONNX external data hashed in the manifest and checked at load -------------------------------------------------
def test_the_export_records_no_external_data(engines):
    """The exporter writes single-file graphs; the manifest says so (an empty list, not a missing record)."""
    assert all(a.external_data == [] for a in load_manifest(engines).artifacts if a.format == "onnx")


def test_external_data_is_recorded_and_loads(engines, engines_copy):
    data = _externalize(engines_copy)
    entry = load_manifest(engines_copy).find("text_encoder")
    assert entry.external_data == [
        {
            "file": "onnx/fp32/text_encoder.onnx.data",
            "bytes": data.stat().st_size,
            "sha256": manifest_module.sha256_file(data),
        }
    ]
    # the weights really moved out of the graph file (measured: a 0.3 MB graph, its integer constants inline, beside
    # 1.2 MB of float weights)
    assert entry.bytes < data.stat().st_size / 2
    got, want = _text_outputs(engines_copy), _text_outputs(engines)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_edited_external_data_is_refused(engines_copy):
    data = _externalize(engines_copy)
    _text_outputs(engines_copy)  # verified and loaded once (its hash now cached for this process)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    data.write_bytes(bytes(raw))
    with pytest.raises(EngineError, match="text_encoder.onnx.data: sha256 differs"):
        _text_outputs(engines_copy)
    data.write_bytes(bytes(raw[:-4]))
    with pytest.raises(EngineError, match="text_encoder.onnx.data: .*truncated"):
        _text_outputs(engines_copy)
    data.unlink()
    with pytest.raises(EngineError, match="text_encoder.onnx.data: .*missing"):
        _text_outputs(engines_copy)


def test_external_data_symlinked_out_is_refused(engines_copy, tmp_path):
    data = _externalize(engines_copy)
    shutil.move(data, _outside(tmp_path, "w.data"))
    data.symlink_to(_outside(tmp_path, "w.data"))
    with pytest.raises(EngineError, match="external_data.*outside the folder"):
        _text_outputs(engines_copy)


def test_external_data_without_a_manifest_record_is_refused(engines_copy):
    """A manifest from before external data was recorded: a graph that needs data files is refused (re-export);
    single-file graphs of such a manifest still load."""
    _externalize(engines_copy)
    _edit_manifest(engines_copy, lambda m: [a.pop("external_data", None) for a in m["artifacts"]])
    with pytest.raises(EngineError, match="text_encoder.onnx.data.*does not record.*re-export"):
        _text_outputs(engines_copy)
    Runtime(engines_copy).runner("video_encoder")


def test_external_data_location_leaving_the_folder_is_refused(engines_copy, tmp_path):
    """A graph whose data location climbs out (`../../..`): refused before any runtime opens it."""
    import onnx

    data = _externalize(engines_copy)
    shutil.move(data, _outside(tmp_path, "w.data"))
    path = engines_copy / TEXT
    proto = onnx.load(str(path), load_external_data=False)
    for init in proto.graph.initializer:
        for kv in init.external_data:
            if kv.key == "location":
                kv.value = "../../../outside/w.data"
    path.write_bytes(proto.SerializeToString())
    _edit_manifest(
        engines_copy,
        lambda m: _text_entry(m).update(
            sha256=manifest_module.sha256_file(path), bytes=path.stat().st_size, external_data=[]
        ),
    )
    with pytest.raises(EngineError, match="external data location '../../../outside/w.data' .*'\\.\\.'"):
        _text_outputs(engines_copy)


def test_large_files_are_hashed_once_per_state(engines_copy, monkeypatch):
    """Loading the same engines again does not read the external data again; an edit is read again."""
    data = _externalize(engines_copy)
    monkeypatch.setattr(manifest_module, "HASH_CACHE_MIN_BYTES", 0)
    calls = []
    real = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda p: calls.append(str(p)) or real(p))
    m = load_manifest(engines_copy)
    entry = m.find("text_encoder")
    for _ in range(2):
        verify_artifact(engines_copy, entry, m.tools)
    assert sum(c.endswith(".data") for c in calls) == 1
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="sha256 differs"):
        verify_artifact(engines_copy, entry, m.tools)
    assert sum(c.endswith(".data") for c in calls) == 2
