"""EgoMCQ through the runtime (`egovlp-deploy mcq` on the exported fp32 engines) and through `egovlp-deploy eval` on
the checkpoint they were exported from choose the same clip for every question of the synthetic set, in every mode,
and report the same accuracy: the two share the reader (data/egomcq.py), the scoring (evaluation.choice_scores)
and the counting (metrics.egomcq_accuracy); only the encoders differ (ONNX Runtime vs PyTorch)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("av")

from egovlp_deploy.cli import main
from egovlp_deploy.data import synth
from egovlp_deploy.evaluation import MODES

# held-out videos make the questions; the tiny model's 32 px frames
TINY = dict(train_videos=1, eval_videos=3, clips_per_video=4, fps=15, clip_seconds=1.6, size=32)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_mcq") / "ds"
    synth.generate(out, seed=5, workers=1, **TINY)
    return out


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
