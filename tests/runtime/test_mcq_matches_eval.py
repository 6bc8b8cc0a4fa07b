"""EgoMCQ through the runtime (`egovlp-deploy mcq` on the exported fp32 engines) and through `egovlp-deploy eval` on
the checkpoint they were exported from choose the same clip for every question of the synthetic set, in every mode,
and report the same accuracy: the two share the reader (data/egomcq.py), the scoring (evaluation.choice_scores)
and the counting (metrics.egomcq_accuracy); only the encoders differ (ONNX Runtime vs PyTorch)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("av")

from egovlp_deploy.cli import main
from egovlp_deploy.evaluation import MODES
from training_cli import tiny_synth_data


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_mcq") / "ds"
    return tiny_synth_data(out, seed=5, train_videos=1, eval_videos=3)  # 3 held-out videos make the questions


def test_runtime_mcq_and_eval_give_the_same_answers(synthetic, engines, rt_model_dir, tmp_path, capsys):
    checkpoint, _ = rt_model_dir
    questions, videos = synthetic / "egomcq.json", synthetic / "videos"
    count = len(json.loads(questions.read_text()))
    assert count >= 6

    eval_out = tmp_path / "eval.json"
    eval_args = ["eval", "--model", str(checkpoint), "--tokenizer", str(engines / "tokenizer"), "--device", "cpu"]
    eval_args += ["--egomcq", str(questions), "--video-root", str(videos), "--predictions", str(eval_out), "--json"]
    assert main(eval_args) == 0
    eval_accuracy = json.loads(capsys.readouterr().out)

    mcq_out = tmp_path / "mcq.json"
    assert (
        main(["mcq", str(questions), "--engines", str(engines), "--video-root", str(videos), "--out", str(mcq_out)])
        == 0
    )
    runtime = json.loads(mcq_out.read_text())

    expected = json.loads(eval_out.read_text())
    answered = {r["key"]: r["predicted"] for r in runtime["results"]}
    assert len(expected) == len(answered) == count
    assert answered == expected
    for mode in MODES:  # the same questions counted the same way
        for group, percent in eval_accuracy[mode].items():
            assert runtime["accuracy"][mode][group] == pytest.approx(percent, abs=0.05)


def test_choices_from_videos_of_different_sizes(synthetic, engines, rt_model_dir, tmp_path):
    """EgoMCQ's choices come from different videos, which need not share a frame size (Ego4D has several): each
    choice is resized on its own, as the evaluation reader does, and the answers stay those of `eval`."""
    import shutil

    import av
    import numpy as np

    videos = tmp_path / "videos"
    shutil.copytree(synthetic / "videos", videos)
    resized = sorted(videos.rglob("*.mp4"))[0]
    with av.open(str(resized)) as src:
        stream = src.streams.video[0]
        rate, frames = stream.average_rate, [f.to_ndarray(format="rgb24") for f in src.decode(stream)]
    with av.open(str(resized), "w") as out:  # the same pictures at 64 x 48 (was 32 x 32)
        enc = out.add_stream("libx264", rate=rate)
        enc.width, enc.height, enc.pix_fmt = 64, 48, "yuv420p"
        for img in frames:
            big = np.repeat(np.repeat(img, 2, axis=0), 2, axis=1)[:48, :64]
            out.mux(enc.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(big), format="rgb24")))
        out.mux(enc.encode())

    checkpoint, _ = rt_model_dir
    questions = synthetic / "egomcq.json"
    eval_out, mcq_out = tmp_path / "eval.json", tmp_path / "mcq.json"
    eval_args = ["eval", "--model", str(checkpoint), "--tokenizer", str(engines / "tokenizer"), "--device", "cpu"]
    eval_args += ["--egomcq", str(questions), "--video-root", str(videos), "--predictions", str(eval_out)]
    assert main(eval_args) == 0
    mcq_args = ["mcq", str(questions), "--engines", str(engines), "--video-root", str(videos), "--out", str(mcq_out)]
    assert main(mcq_args) == 0
    answered = {r["key"]: r["predicted"] for r in json.loads(mcq_out.read_text())["results"]}
    assert answered == json.loads(eval_out.read_text())
