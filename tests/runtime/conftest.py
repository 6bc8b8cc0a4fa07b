"""Runtime fixtures: one tiny model with random non-zero weights (so cross-attention matters), exported once per
test run to ONNX (all five roles, fp32; `built_once`), a demo tokenizer beside the engines, and three short videos
in the EgoClip chunked layout (ROOT/<uid>/0.mp4)."""

import json
import shutil

import pytest

from official_format import random_tiny
from shared_folders import built_once
from video_files import write_video


@pytest.fixture(scope="session")
def rt_model_dir(tmp_path_factory):
    model = random_tiny(seed=11)

    def save(folder):
        model.save_pretrained(folder / "tiny")

    folder, _ = built_once(tmp_path_factory, "tiny-seed11", save)
    return folder / "tiny", model


@pytest.fixture(scope="session")
def engines(tmp_path_factory, rt_model_dir):
    from egovlp_deploy.export.runner import ExportOptions, run_export
    from egovlp_deploy.tokenizer import train_demo_tokenizer

    ckpt, _ = rt_model_dir

    def export(folder):
        options = ExportOptions(max_batch=8, task_checks=False, ort_optimize="never")
        result = run_export(str(ckpt), folder / "engines", options, quiet=True)
        assert result.passed, result.errors
        train_demo_tokenizer(folder / "engines" / "tokenizer")

    folder, _ = built_once(tmp_path_factory, "rt-engines", export)
    return folder / "engines"


@pytest.fixture
def engines_copy(engines, tmp_path):
    dst = tmp_path / "engines_copy"
    shutil.copytree(engines, dst)
    return dst


@pytest.fixture(scope="session")
def video_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt_videos")
    for uid, frames in (("vid_a", 30), ("vid_b", 25), ("vid_c", 20)):
        write_video(root / uid / "0.mp4", frames)  # 10 fps: 3.0, 2.5, 2.0 s
    return root


@pytest.fixture(scope="session")
def mcq_json(tmp_path_factory, video_root):
    def row(uid, start, end, text="#C C picks up the red cup"):
        return {
            "video_uid": uid,
            "clip_start": start,
            "clip_end": end,
            "clip_text": text,
            "tag_verb": "[0]",
            "tag_noun": "[0]",
        }

    questions = {}
    for q in range(2):
        choices = [
            row("vid_a", 0.0, 1.0),
            row("vid_a", 1.0, 2.0),
            row("vid_b", 0.5, 1.5),
            row("vid_b", 1.5, 2.5),
            row("vid_c", 0.2, 1.2),
        ]
        questions[str(q)] = {
            "types": 1 + q,
            "query": row("vid_a", 0.0, 1.0, "#C C opens the blue box"),
            "choices": {str(i): c for i, c in enumerate(choices)},
            "answer": q,
        }
    path = tmp_path_factory.mktemp("rt_mcq") / "egomcq.json"
    path.write_text(json.dumps(questions))
    return path
