"""`egovlp-deploy eval` (EgoMCQDataset) and the runtime's `mcq` read EgoMCQ files through one reader: crafted bad
files are rejected by both, before any video is read, with the same DataError naming the question's key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from egovlp_deploy.data import DataError, EgoMCQDataset
from egovlp_deploy.runtime.mcq import _load_questions, answer_mcq


def clip(start=0.0, end=1.0, text="#C C opens the drawer") -> dict:
    return {
        "video_uid": "vid_a",
        "video_dur": 900.0,
        "clip_start": start,
        "clip_end": end,
        "clip_text": text,
        "tag_verb": "[1]",
        "tag_noun": "[2]",
    }


def question(**changes) -> dict:
    q = {
        "types": 1,
        "query": clip(text="#C C picks up the cup"),
        "choices": {str(k): clip(start=k, end=k + 1.0) for k in range(5)},
        "answer": 2,
    }
    return q | changes


def choices(keys) -> dict:
    return {str(k): clip(start=i, end=i + 1.0) for i, k in enumerate(keys)}


def with_choice_start(value) -> dict:
    q = question()
    q["choices"]["3"]["clip_start"] = value
    return q


BAD = {
    "answer 7": (question(answer=7), "bad answer: answer 7 is not a choice index in [0, 5)"),
    "answer '0'": (question(answer="0"), "bad answer: answer '0' is not a choice index"),
    "answer -1": (question(answer=-1), "bad answer: answer -1"),
    "answer 0.0": (question(answer=0.0), "bad answer: answer 0.0"),
    "answer true": (question(answer=True), "bad answer: answer True"),
    "three choices": (question(choices=choices(range(3)), answer=0), "wrong number of choices"),
    "a gap in the keys": (question(choices=choices([0, 1, 2, 3, 5])), "wrong number of choices"),
    "types 3": (question(types=3), "bad types: types 3 is not 1 (inter) or 2 (intra)"),
    "NaN clip_start": (with_choice_start(float("nan")), "choice 3: nan is not finite"),
    "empty narration": (question(query=clip(text=" ")), "empty narration"),
    "zero-width narration": (question(query=clip(text="\u200b\ufeff")), "has no visible character"),
}


@pytest.fixture(scope="module")
def video_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mcq_videos")
    (root / "vid_a").mkdir()
    # only its existence (a non-empty file) is checked: no bad file gets to a decoder
    (root / "vid_a" / "0.mp4").write_bytes(b"placeholder")
    return root


def write(tmp_path: Path, bad: dict) -> Path:
    path = tmp_path / "egomcq.json"
    path.write_text(json.dumps({"0": question(), "1": bad, "2": question(answer=4)}))  # json writes NaN as NaN
    return path


def no_reader(*args, **kwargs):
    raise AssertionError("a video was read")


@pytest.mark.parametrize("case", sorted(BAD))
def test_eval_and_mcq_reject_the_same_file_with_the_same_message(tmp_path, video_root, case):
    bad, reason = BAD[case]
    path = write(tmp_path, bad)
    with pytest.raises(DataError) as from_eval:
        EgoMCQDataset(path, video_root, num_frames=2, size=16, clip_reader=no_reader)
    with pytest.raises(DataError) as from_mcq:
        answer_mcq(path, video_root, runtime=None, progress=False)  # fails before it touches the runtime
    assert str(from_mcq.value) == str(from_eval.value)
    assert str(from_eval.value).startswith(f"{path}: key '1': ") and reason in str(from_eval.value)


def test_both_accept_a_good_file_alike(tmp_path, video_root):
    path = tmp_path / "egomcq.json"
    path.write_text(json.dumps({"10": question(answer=1, types=2), "2": question()}))
    dataset = EgoMCQDataset(path, video_root, num_frames=2, size=16, clip_reader=no_reader)
    questions = _load_questions(path, video_root)
    assert [q["key"] for q in questions] == [e.key for e in dataset.entries] == ["2", "10"]
    assert [(q["answer"], q["type"]) for q in questions] == [(2, 1), (1, 2)]
    assert questions[0]["choices"][4] == ("vid_a", 4.0, 5.0)


def test_mcq_alone_allows_an_unanswered_question(tmp_path, video_root):
    q = question()
    del q["answer"]
    path = tmp_path / "egomcq.json"
    path.write_text(json.dumps({"0": q}))
    assert _load_questions(path, video_root)[0]["answer"] is None
    with pytest.raises(DataError, match="key '0': malformed entry: missing fields \\['answer'\\]"):
        EgoMCQDataset(path, video_root, num_frames=2, size=16, clip_reader=no_reader)


def test_mcq_checks_the_videos_exist_before_reading_any(tmp_path, video_root):
    q = question()
    q["choices"]["4"] = clip(start=700.0, end=701.0)  # chunk 1.mp4, which is not there
    path = tmp_path / "egomcq.json"
    path.write_text(json.dumps({"0": question(), "5": q}))
    with pytest.raises(DataError, match=r"key '5': missing video: choice 4: .*1.mp4 does not exist"):
        _load_questions(path, video_root)


def test_the_mcq_command_reports_a_bad_file_in_one_line(tmp_path, video_root, capsys, monkeypatch):
    from egovlp_deploy.cli import main
    from egovlp_deploy.runtime import commands as runtime_commands

    monkeypatch.setattr(runtime_commands, "_runtime", lambda args: None)  # no engines needed to reject the file
    path = write(tmp_path, question(answer=7))
    assert main(["mcq", str(path), "--video-root", str(video_root), "--engines", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"egovlp-deploy mcq: error: {path}: key '1': bad answer: answer 7 is not a choice index in [0, 5)"]
