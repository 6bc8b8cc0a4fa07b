"""`egovlp-deploy info PATH`: checkpoints, training runs, engines folders and indexes described from their JSON
files and safetensors headers (text and --json), the export an index was built with, and the clear error on a
folder that is none of these."""

import hashlib
import json

from egovlp_deploy.cli import main
from egovlp_deploy.runtime import EngineFolder, IndexSettings, MomentIndex, Runtime, build_index


def _info(capsys, *args) -> tuple[int, str, str]:
    code = main(["info", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def _describe(capsys, *args) -> dict:
    code, out, _ = _info(capsys, *args, "--json")
    assert code == 0
    return json.loads(out)


def _index(engines, video_root, out) -> str:
    build_index(
        out,
        [str(video_root / "vid_c" / "0.mp4")],
        Runtime(engines),
        IndexSettings(frames=4, window_sec=1.0, stride_sec=0.5, prefixes=True),
        progress=False,
    )
    return str(out)


def test_checkpoint_folder_and_training_run(rt_model_dir, tmp_path, capsys):
    from egovlp_deploy.trainer.training_state import save_checkpoint

    folder, model = rt_model_dir
    d = _describe(capsys, folder)
    assert (d["kind"], d["format_version"], d["checkpoint_kind"]) == ("checkpoint", 1, "pretrained")
    assert d["step"] is None and d["complete"] is None and d["run"] is None and d["tokenizer"] is None
    assert d["config"]["video"]["num_frames"] == 4 and d["config"]["projection_dim"] == 128
    w = d["weights"]
    assert w["parameters"] == sum(p.numel() for p in model.state_dict().values())
    assert w["tensors"] == len(model.state_dict()) and w["dtypes"] == {"F32": w["tensors"]}
    assert sum(w["parameters_by_module"].values()) == w["parameters"] and "video_model" in w["parameters_by_module"]
    code, out, _ = _info(capsys, folder / "model.safetensors")  # a marker file stands for its folder
    assert code == 0 and "pretrained checkpoint" in out and f"{w['parameters']:,} parameters" in out

    run = tmp_path / "run"
    for step in (3, 5):
        save_checkpoint(run / "checkpoints", step, model, {"step": step}, {"seed": 0})
    (run / "tokenizer").mkdir()
    (run / "tokenizer" / "tokenizer.json").write_text("{}")
    d = _describe(capsys, run)
    assert d["checkpoint_kind"] == "trainer" and d["step"] == 5 and d["complete"] is True
    assert d["run"] == {"path": str(run.resolve()), "steps": [3, 5]}
    assert d["path"].endswith("step_00000005") and d["tokenizer"] == str((run / "tokenizer").resolve())
    code, out, _ = _info(capsys, run)
    assert code == 0
    assert "trainer checkpoint, step 5, complete" in out and "steps 3, 5; described: the newest" in out
    (run / "checkpoints" / "step_00000005" / "state.json").write_text("{}")  # another size than MANIFEST.json says
    assert _describe(capsys, run / "checkpoints" / "step_00000005")["complete"] is False


def test_engines_folder(engines, capsys):
    d = _describe(capsys, engines)
    folder = EngineFolder(engines)
    assert (d["kind"], d["format_version"], d["path"]) == ("engines", 1, str(engines.resolve()))
    assert d["model_id"] == folder.model_id
    assert d["manifest_sha256"] == hashlib.sha256((engines / "manifest.json").read_bytes()).hexdigest()
    assert d["roles"] == ["fusion", "fusion_head", "text_encoder", "video_encoder", "video_fusion_prefix"]
    assert d["formats"] == ["onnx"] and d["precisions"] == ["fp32"] and d["max_batch"] == 8
    assert d["validation"]["passed"] is True and d["validation"]["errors"] == []
    assert d["source_checkpoint"]["kind"] == "pretrained" and d["config"]["projection_dim"] == 128
    video = next(a for a in d["artifacts"] if a["role"] == "video_encoder")
    assert video["inputs"] == [{"name": "video", "shape": ["batch", 4, 3, 32, 32], "dtype": "float32"}]
    assert video["outputs"][0]["name"] == "video_embedding" and video["passed"] is True
    code, out, _ = _info(capsys, engines)
    assert code == 0
    for expected in (
        f"model id    {folder.model_id}",
        d["manifest_sha256"],
        "roles       fusion, fusion_head",
        "validation  passed",
        "video[batch,4,3,32,32] float32 -> video_embedding[batch,128] float32",
    ):
        assert expected in out, expected


def test_index_and_the_export_it_was_built_with(engines, engines_copy, video_root, tmp_path, capsys):
    idx = _index(engines, video_root, tmp_path / "idx")
    sha = hashlib.sha256((engines / "manifest.json").read_bytes()).hexdigest()
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["engines_manifest_sha256"] == sha
    d = _describe(capsys, idx)
    assert (d["kind"], d["format_version"], d["index_version"]) == ("index", 1, 1)
    assert d["model_id"] == EngineFolder(engines).model_id and d["engines_manifest_sha256"] == sha
    assert d["engines_now"]["same_model"] is True and d["engines_now"]["same_export"] is True
    assert d["windows"] == 3 and d["settings"]["prefixes"] is True and d["embed_dim"] == 128
    assert d["videos"] == [
        {"path": str((video_root / "vid_c" / "0.mp4").resolve()), "name": "vid_c/0.mp4", "windows": 3, "indexed": 3}
    ]
    assert d["shards"]["count"] == 1 and d["shards"]["bytes"] > 0
    code, out, _ = _info(capsys, idx)
    assert code == 0 and "1 videos, 3 clips, 128-d embeddings" in out and "the same export" in out

    # Another export of the same model (here: the manifest written again): search works and says so, info shows
    # the recorded manifest hash and the new one.
    manifest = json.loads((engines_copy / "manifest.json").read_text())
    manifest["created"] = "2000-01-01T00:00:00+00:00"
    (engines_copy / "manifest.json").write_text(json.dumps(manifest))
    other = hashlib.sha256((engines_copy / "manifest.json").read_bytes()).hexdigest()
    assert main(["search", idx, "#C C opens the box", "--engines", str(engines_copy), "--json"]) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)["#C C opens the box"]) == 3 and "another export of the index's model" in err
    d = _describe(capsys, idx, "--engines", engines_copy)
    assert d["engines_manifest_sha256"] == sha and d["engines_now"]["manifest_sha256"] == other
    assert d["engines_now"]["same_model"] is True and d["engines_now"]["same_export"] is False
    code, out, _ = _info(capsys, idx, "--engines", engines_copy)
    assert sha in out and other in out and "another export of the same model" in out

    # An index written before the hash was recorded reads as it is: no note, no hash, nothing to compare.
    data = json.loads((tmp_path / "idx" / "index.json").read_text())
    del data["engines_manifest_sha256"]
    (tmp_path / "idx" / "index.json").write_text(json.dumps(data))
    assert len(MomentIndex(idx)) == 3
    assert main(["search", idx, "#C C opens the box", "--engines", str(engines_copy)]) == 0
    assert "another export" not in capsys.readouterr().err
    d = _describe(capsys, idx)
    assert d["engines_manifest_sha256"] is None and d["engines_now"]["same_export"] is None
    code, out, _ = _info(capsys, idx)
    assert code == 0 and "manifest sha256 not recorded" in out


def test_not_an_artifact(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    code, out, err = _info(capsys, tmp_path)
    assert code == 2 and out == ""
    assert err.strip() == (
        f"egovlp-deploy info: error: {tmp_path}: not a checkpoint, an engines folder or an index "
        "(no model.safetensors, checkpoints/, manifest.json or index.json in it)"
    )
    code, _, err = _info(capsys, tmp_path / "notes.txt")
    assert code == 2 and "not a checkpoint, an engines folder or an index" in err
    code, _, err = _info(capsys, tmp_path / "missing")
    assert code == 2 and "no such file or folder" in err
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)  # looks like a checkpoint, is not one
    (tmp_path / "config.json").write_text("{}")
    code, _, err = _info(capsys, tmp_path)
    assert code == 2 and "not a safetensors file" in err and len(err.strip().splitlines()) == 1
