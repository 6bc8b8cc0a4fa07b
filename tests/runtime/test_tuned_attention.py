"""The torch backend with `attention="tuned"`: per attention shape the implementation measured fastest here
(model/attention_plan.py), the same outputs as the reference math, picks kept in a plan file across runs and
printed by the commands."""

import json

import numpy as np
import pytest

from egovlp_deploy.cli import main
from egovlp_deploy.runtime.engines import EngineError, Runtime


def _encode_all(rt):
    clips = np.random.default_rng(3).standard_normal((2, *rt.video_encoder.clip_shape)).astype(np.float32)
    ids = np.array([[0, 11, 12, 13, 14, 2], [0, 15, 16, 2, 1, 1]], np.int64)
    mask = (ids != 1).astype(np.int64)
    prefix = rt.video_encoder.fusion_prefix(clips)
    text = rt.runner("text_encoder")(input_ids=ids, attention_mask=mask)
    return {
        "video": rt.video_encoder.encode(clips),
        "text": text["text_embedding"],
        "vtm": rt.fusion.score_prefixes(prefix, text["text_prefix"], mask),
    }


def test_tuned_attention_equals_the_reference_and_records_its_picks(engines, tmp_path):
    plan_file = tmp_path / "plan.json"
    want = _encode_all(Runtime(engines, backend="torch", attention="reference", warmup=False))
    rt = Runtime(engines, backend="torch", attention="tuned", attention_plan=plan_file, warmup=False)
    got = _encode_all(rt)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    entries = json.loads(plan_file.read_text())["entries"]
    ops = {e["op"] for e in entries}
    assert {"divided_time", "divided_space", "attention"} <= ops
    assert all(e["pick"] in ("sdpa", "reference") and e["metric"] == "wall" for e in entries)
    assert all(r["attention"].startswith("tuned attention (wall)") for r in rt.describe())
    assert len(rt.attention_plan.report()) == len(entries)

    again = Runtime(engines, backend="torch", attention="tuned", attention_plan=plan_file, warmup=False)
    _encode_all(again)
    assert again.attention_plan.measured == 0  # every shape's pick came from the file


def test_tuned_attention_options_are_checked(engines, tmp_path):
    with pytest.raises(EngineError, match="torch-backend option"):
        Runtime(engines, backend="onnxruntime", attention="tuned")
    with pytest.raises(EngineError, match="attention 'tuned'"):
        Runtime(engines, backend="torch", attention="auto", attention_plan=tmp_path / "plan.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "something else"}')
    rt = Runtime(engines, backend="torch", attention="tuned", attention_plan=bad, warmup=False)
    with pytest.raises(EngineError, match="not an attention plan"):
        rt.text_encoder.encode(["#C C opens the fridge"])
    assert bad.read_text() == '{"kind": "something else"}'


def test_mcq_prints_the_attention_picks(engines, video_root, mcq_json, tmp_path, capsys):
    plan_file = tmp_path / "plan.json"
    args = ["mcq", str(mcq_json), "--video-root", str(video_root), "--engines", str(engines), "--backend", "torch"]
    assert main([*args, "--attention", "tuned", "--attention-plan", str(plan_file)]) == 0
    tuned = capsys.readouterr()
    assert "tuned attention (wall):" in tuned.err and "divided_time batch=" in tuned.err
    assert main(args) == 0
    plain = capsys.readouterr()
    assert plain.out.splitlines()[1:] == tuned.out.splitlines()[1:]  # same accuracies (the first line is the time)
    assert main([*args, "--attention", "tuned", "--attention-plan", str(tmp_path / "no" / "plan.json")]) != 0
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (graph replays, Triton)")
@pytest.mark.parametrize("graphs", [False, True])
def test_tuned_attention_on_the_gpu_equals_eager_reference(engines, tmp_path, graphs):
    """On CUDA: candidates timed as graph replays (graphs on) or eager calls; fp16 outputs match the reference."""
    kw = {"backend": "torch", "device": "cuda", "precision": "fp16", "warmup": False}
    want = _encode_all(Runtime(engines, attention="reference", **kw))
    rt = Runtime(engines, attention="tuned", graphs=graphs, attention_plan=tmp_path / "plan.json", **kw)
    got = _encode_all(rt)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-2, atol=2e-2, err_msg=name)
    entries = json.loads((tmp_path / "plan.json").read_text())["entries"]
    assert {e["metric"] for e in entries} == {"graph" if graphs else "wall"}
    assert all(set(e["ms"]) | set(e["rejected"]) == {"triton", "sdpa", "reference"} for e in entries)
