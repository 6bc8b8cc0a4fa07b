"""Zero-shot EK-100 MIR and Charades-Ego evaluation (`egovlp-deploy eval --epic-mir / --charades`) end to end on the
synthetic stand-ins in the official formats, plus the alignment of embeddings, relevancy and targets checked with
an oracle encoder that must score 100 % mAP."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("av")

from egovlp_deploy import checkpoint
from egovlp_deploy import evaluation as evaluate
from egovlp_deploy.cli import main
from egovlp_deploy.data import synth, synth_downstream
from official_format import saved_random_tiny
from oracle_encoder import OracleEncoder

TINY = dict(train_videos=1, eval_videos=3, clips_per_video=4, fps=15, clip_seconds=1.6, size=32)
METRICS = {"nDCG_V2T", "nDCG_T2V", "nDCG_AVG", "mAP_V2T", "mAP_T2V", "mAP_AVG"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    synth.generate(out, seed=11, workers=1, **TINY)
    return out


def _eval_args(data, model, tokenizer, *extra):
    return [
        "eval",
        "--model",
        str(model),
        "--tokenizer",
        str(tokenizer),
        "--device",
        "cpu",
        "--epic-mir",
        str(data / "epic"),
        "--charades",
        str(data / "charades"),
        "--charades-classes",
        str(len(synth_downstream.charades_classes())),
        *extra,
    ]


def test_cli_zero_shot_epic_mir_and_charades(data, tmp_path, demo_tokenizer_dir, capsys):
    model, _ = saved_random_tiny(tmp_path / "tiny", seed=3)
    assert main(_eval_args(data, model, demo_tokenizer_dir, "--json", "--batch-size", "6")) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"epic_mir", "charades"}
    assert set(result["epic_mir"]) == METRICS and set(result["charades"]) == {"mAP"}
    assert all(0 < v <= 100 for r in result.values() for v in r.values())

    assert main(_eval_args(data, model, demo_tokenizer_dir, "--frames", "4")) == 0  # --frames overrides 16 / 32
    text = capsys.readouterr().out
    # a save_pretrained folder does not record what the model was trained on
    regime = "(zero-shot if not fine-tuned on it: training not recorded)"
    assert f"EK-100 MIR {regime} on 12 clips, 4 frames" in text and "mAP_AVG" in text and "nDCG_AVG" in text
    assert f"Charades-Ego {regime} on 3 videos, 46 classes, 4 frames" in text


def test_cli_needs_a_benchmark(tmp_path, demo_tokenizer_dir, capsys):
    assert main(["eval", "--model", str(tmp_path), "--tokenizer", str(demo_tokenizer_dir)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--tokenizer", str(demo_tokenizer_dir), "--egomcq", "q.json"]) == 2
    assert "--video-root" in capsys.readouterr().err
    # checked before any model is loaded or question scored
    egomcq = ["--egomcq", "q.json", "--video-root", str(tmp_path)]
    missing = tmp_path / "no" / "p.json"
    assert (
        main(
            [
                "eval",
                "--model",
                "random:huge",
                "--tokenizer",
                str(demo_tokenizer_dir),
                *egomcq,
                "--predictions",
                str(missing),
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.strip().endswith(f"--predictions {missing}: its folder does not exist")
    assert (
        main(
            [
                "eval",
                "--model",
                "random:tiny",
                "--tokenizer",
                str(demo_tokenizer_dir),
                "--epic-mir",
                str(tmp_path),
                "--predictions",
                str(tmp_path / "p.json"),
            ]
        )
        == 2
    )
    assert "--predictions holds EgoMCQ answers: it needs --egomcq" in capsys.readouterr().err


def test_cli_predictions_path_that_is_a_folder_is_refused_before_the_run(tmp_path, demo_tokenizer_dir, capsys):
    """The answers are written after every question is scored: a folder there would lose the whole run."""
    (tmp_path / "answers").mkdir()
    argv = ["eval", "--model", "random:huge", "--tokenizer", str(demo_tokenizer_dir)]  # the model would fail later
    argv += ["--egomcq", "q.json", "--video-root", str(tmp_path), "--predictions", str(tmp_path / "answers")]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().endswith(f"--predictions {tmp_path / 'answers'}: is a folder, not a file")


def test_cli_predictions_in_a_folder_that_is_not_writable_is_refused_before_the_run(
    tmp_path, demo_tokenizer_dir, capsys, monkeypatch
):
    monkeypatch.setattr(checkpoint.os, "access", lambda path, mode: False)  # root may write anywhere
    argv = ["eval", "--model", "random:huge", "--tokenizer", str(demo_tokenizer_dir)]
    argv += ["--egomcq", "q.json", "--video-root", str(tmp_path), "--predictions", str(tmp_path / "p.json")]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().endswith(f"--predictions {tmp_path / 'p.json'}: its folder is not writable")


@pytest.mark.parametrize("count", ["0", "-1", "two"])
def test_cli_max_questions_below_one_is_refused_at_parsing(tmp_path, count, capsys):
    argv = ["eval", "--model", "random:huge", "--tokenizer", str(tmp_path), "--egomcq", "q.json"]
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--video-root", str(tmp_path), "--max-questions", count])
    assert stop.value.code == 2
    assert "argument --max-questions: " in capsys.readouterr().err


@pytest.mark.parametrize("size", ["0", "-2"])
def test_cli_batch_size_below_one_is_refused_at_parsing(tmp_path, size, capsys):
    """Refused by the parser, not by the first DataLoader after the model has loaded."""
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--model", "random:huge", "--tokenizer", str(tmp_path), "--epic-mir", "x", "--batch-size", size])
    assert stop.value.code == 2
    assert "argument --batch-size: must be 1 or more" in capsys.readouterr().err


def test_cli_reads_every_benchmark_before_running_the_first(data, tmp_path, demo_tokenizer_dir, capsys, monkeypatch):
    """A Charades-Ego class count that does not match its file is an error before EK-100 MIR is scored: the EK-100
    result would otherwise be computed and then lost to the Charades-Ego error."""
    from egovlp_deploy.trainer import evaluate as command

    scored = []
    monkeypatch.setattr(command, "evaluate_epic_mir", lambda *args, **kwargs: scored.append(1))
    model, _ = saved_random_tiny(tmp_path / "tiny", seed=3)
    argv = _eval_args(data, model, demo_tokenizer_dir)
    argv[argv.index("--charades-classes") + 1] = "5"
    assert main(argv) == 2
    assert "classes, expected 5" in capsys.readouterr().err
    assert scored == []


@pytest.mark.parametrize(
    "device, message",
    [("tpu", "--device 'tpu': expected auto, cpu, cuda or cuda:N"), ("cuda", "--device cuda: CUDA is not available")],
)
def test_cli_device_that_is_not_there_is_one_line_before_the_model_loads(
    tmp_path, demo_tokenizer_dir, capsys, monkeypatch, device, message
):
    monkeypatch.delenv("EGOVLP_DEBUG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, also where GPUs are
    argv = ["eval", "--model", "random:huge", "--tokenizer", str(demo_tokenizer_dir), "--device", device]
    assert main([*argv, "--egomcq", "q.json", "--video-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"egovlp-deploy eval: error: {message}")


def test_oracle_scores_100_map(data):
    epic = evaluate.epic_test_dataset(data / "epic", data / "epic" / "videos", 2, 32)
    sentences = list(epic.sentences)
    texts = [r["narration"] for r in epic._rows]
    oracle = OracleEncoder.showing(sentences, texts)
    result = evaluate.evaluate_epic_mir(oracle, epic, oracle.tokenizer, "cpu", batch_size=5)
    assert result["mAP_V2T"] == result["mAP_T2V"] == 100.0

    num_classes = len(synth_downstream.charades_classes())
    charades = evaluate.charades_test_dataset(data / "charades", data / "charades" / "videos", 2, 32, num_classes)
    targets = [torch.nonzero(charades[i]["target"]).flatten().tolist() for i in range(len(charades))]
    oracle = OracleEncoder(charades.prompts, targets)
    assert evaluate.evaluate_charades(oracle, charades, oracle.tokenizer, "cpu", batch_size=2) == {"mAP": 100.0}
