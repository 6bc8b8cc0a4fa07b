"""`egovlp-deploy mcq --out FILE` records each answer as it is made in FILE.partial.jsonl: a run stopped after k
questions (Ctrl-C, a damaged video) resumes when the same command runs again, answers only the other questions and
writes the FILE an uninterrupted run writes, byte for byte; a progress file of another run is refused and left as
it is, a last line cut short by a kill is answered again. The clips are decoded in a background thread while the
engines run, with the answers of the serial path and its errors.

The clock `mcq` reads is frozen, so the summary's `seconds` is the same in every run and the files compare whole."""

from __future__ import annotations

import json
import shutil
import threading
import types

import pytest

pytest.importorskip("av")

from egovlp_deploy.cli import main
from egovlp_deploy.data.errors import DataError
from egovlp_deploy.runtime import mcq
from egovlp_deploy.runtime.engines import Runtime
from video_files import write_video

NUM_QUESTIONS = 6
BAD = "3"  # the question with a choice from vid_d, the video the failure test damages
NARRATIONS = [
    "#C C picks up the red cup",
    "#C C opens the blue box",
    "#C C cuts the onion",
    "#C C closes the door",
    "#C C washes a plate",
    "#C C reads the paper",
]
SEGMENTS = [
    ("vid_a", 0.0, 1.0),
    ("vid_a", 1.0, 2.0),
    ("vid_b", 0.5, 1.5),
    ("vid_b", 1.5, 2.5),
    ("vid_c", 0.2, 1.2),
    ("vid_a", 2.0, 3.0),
    ("vid_c", 1.0, 2.0),
]


def _row(uid, start, end, text="#C C picks up the red cup"):
    return {
        "video_uid": uid,
        "clip_start": start,
        "clip_end": end,
        "clip_text": text,
        "tag_verb": "[0]",
        "tag_noun": "[0]",
    }


def _questions(narrations=NARRATIONS) -> dict:
    out = {}
    for q, text in enumerate(narrations):
        choices = [SEGMENTS[(q + j) % len(SEGMENTS)] for j in range(5)]
        if str(q) == BAD:
            choices[2] = ("vid_d", 0.5, 1.5)
        out[str(q)] = {
            "types": 1 + q % 2,
            "query": _row("vid_a", 0.0, 1.0, text),
            "choices": {str(i): _row(*c) for i, c in enumerate(choices)},
            "answer": q % 5,
        }
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory, video_root):
    """(questions file, video folder) with vid_a..vid_d."""
    folder = tmp_path_factory.mktemp("mcq_resume")
    root = folder / "videos"
    shutil.copytree(video_root, root)
    write_video(root / "vid_d" / "0.mp4", 30)
    questions = folder / "egomcq.json"
    questions.write_text(json.dumps(_questions()))
    return questions, root


FROZEN = types.SimpleNamespace(perf_counter=lambda: 0.0)


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch):
    monkeypatch.setattr(mcq, "time", FROZEN)


def _args(questions, root, engines, out=None, *extra):
    args = ["mcq", str(questions), "--engines", str(engines), "--video-root", str(root), "--json", *extra]
    return args + (["--out", str(out)] if out is not None else [])


@pytest.fixture(scope="module")
def reference(data, engines, tmp_path_factory):
    """The --out file of an uninterrupted run."""
    questions, root = data
    out = tmp_path_factory.mktemp("mcq_reference") / "answers.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mcq, "time", FROZEN)
        assert main(_args(questions, root, engines, out)) == 0
    assert not mcq.progress_path(out).exists()
    assert len(json.loads(out.read_text())["results"]) == NUM_QUESTIONS
    return out.read_bytes()


def _count_decodes(monkeypatch) -> list[tuple[str, int, str]]:
    """(question key, choice, thread name) of each choice `mcq` decodes from now on."""
    calls, read = [], mcq._read_choice

    def counted(questions_json, video_root, q, i, frames, backend):
        calls.append((q["key"], i, threading.current_thread().name))
        return read(questions_json, video_root, q, i, frames, backend)

    monkeypatch.setattr(mcq, "_read_choice", counted)
    return calls


def _count_answers(monkeypatch, stop_after: int | None = None) -> list[int]:
    """One entry per question the engines answer from now on; Ctrl-C (in the main thread) when the engines are
    about to answer the question after `stop_after` answers."""
    calls, scores = [], mcq._scores

    def counted(*args):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append(1)
        return scores(*args)

    monkeypatch.setattr(mcq, "_scores", counted)
    return calls


def _decoders_running() -> bool:
    return any(t.name == "egovlp-decode" for t in threading.enumerate())


def _interrupted_run(monkeypatch, questions, root, engines, out, k: int) -> None:
    """A run stopped by Ctrl-C after k questions are answered."""
    with monkeypatch.context() as patch:
        _count_answers(patch, stop_after=k)
        assert main(_args(questions, root, engines, out)) == 130
    assert not _decoders_running()  # Ctrl-C stopped the background decoder


def test_interrupted_run_resumes_and_writes_what_an_uninterrupted_run_writes(
    data, engines, reference, tmp_path, monkeypatch, capsys
):
    questions, root = data
    out = tmp_path / "answers.json"
    k = 2
    _interrupted_run(monkeypatch, questions, root, engines, out, k)
    progress = mcq.progress_path(out)
    assert progress.name == "answers.json.partial.jsonl"
    lines = progress.read_text().splitlines()
    assert len(lines) == 1 + k and json.loads(lines[0])["format"] == mcq.PROGRESS_FORMAT
    assert not out.exists()
    err = capsys.readouterr().err
    assert f"{k} of {NUM_QUESTIONS} answers are kept in {progress}" in err

    decodes, answers = _count_decodes(monkeypatch), _count_answers(monkeypatch)
    assert main(_args(questions, root, engines, out)) == 0
    assert f"resuming: {k} of {NUM_QUESTIONS} questions already answered" in capsys.readouterr().err
    assert len(answers) == NUM_QUESTIONS - k  # only the rest is answered and decoded
    assert sorted({key for key, _, _ in decodes}) == [str(q) for q in range(k, NUM_QUESTIONS)]
    assert out.read_bytes() == reference
    assert not progress.exists()


def test_last_line_cut_short_by_a_kill_is_answered_again(data, engines, reference, tmp_path, monkeypatch, capsys):
    questions, root = data
    out = tmp_path / "answers.json"
    _interrupted_run(monkeypatch, questions, root, engines, out, 3)
    progress = mcq.progress_path(out)
    text = progress.read_bytes()
    last = text.rstrip(b"\n").rfind(b"\n") + 1
    progress.write_bytes(text[: last + (len(text) - last) // 2])  # the third answer half written, no newline
    capsys.readouterr()
    _interrupted_run(monkeypatch, questions, root, engines, out, 1)  # resumed, then stopped after one answer
    lines = progress.read_bytes().splitlines()
    assert len(lines) == 1 + 3 and all(json.loads(line) for line in lines)  # the cut line gone, not glued to one
    capsys.readouterr()

    decodes, answers = _count_decodes(monkeypatch), _count_answers(monkeypatch)
    assert main(_args(questions, root, engines, out)) == 0
    assert f"resuming: 3 of {NUM_QUESTIONS} questions already answered" in capsys.readouterr().err
    assert len(answers) == NUM_QUESTIONS - 3
    assert sorted({key for key, _, _ in decodes}) == [str(q) for q in range(3, NUM_QUESTIONS)]
    assert out.read_bytes() == reference
    assert not progress.exists()


def test_a_second_run_with_the_same_out_is_refused_while_the_first_answers(data, engines, tmp_path):
    """Two runs appending to one progress file would mix their lines, and the first to finish would delete the
    file the other still writes: the file is locked for the run."""
    questions, root = data
    out = tmp_path / "answers.json"
    runtime = Runtime(engines)
    first = mcq.Progress(mcq.progress_path(out), {"run": 1})
    first.open([])
    try:
        with pytest.raises(ValueError, match="another `egovlp-deploy mcq` run with this --out is answering now"):
            mcq.answer_mcq(questions, root, runtime, progress=False, progress_file=mcq.progress_path(out))
    finally:
        first.close()


def test_progress_of_another_run_is_refused_and_left_as_it_is(data, engines, tmp_path, monkeypatch, capsys):
    """Refused (exit 2) rather than restarted: a run of 39,000 answers is not thrown away for a mistyped option;
    the message says how to start over. The file is not changed, nor FILE written."""
    questions, root = data
    out = tmp_path / "answers.json"
    _interrupted_run(monkeypatch, questions, root, engines, out, 2)
    progress = mcq.progress_path(out)
    before = progress.read_bytes()
    capsys.readouterr()

    other = tmp_path / "other.json"  # another questions file: one narration changed
    other.write_text(json.dumps(_questions([*NARRATIONS[:-1], "#C C drops the spoon"])))
    answers = _count_answers(monkeypatch)
    refusals = {
        "another questions file": _args(other, root, engines, out),
        "--max-questions None there, 4 here": _args(questions, root, engines, out, "--max-questions", "4"),
    }
    for reason, args in refusals.items():
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"egovlp-deploy mcq: error: {progress}: the answers of another run (")
        assert reason in err and f"delete {progress} to start this run over" in err
        assert progress.read_bytes() == before and not out.exists()

    # other engines: the header names another manifest
    header, _, rest = before.partition(b"\n")
    recorded = json.loads(header)
    recorded["run"]["engines_manifest_sha256"] = "0" * 64
    progress.write_bytes(json.dumps(recorded).encode() + b"\n" + rest)
    assert main(_args(questions, root, engines, out)) == 2
    assert "another engines (sha256 of manifest.json)" in capsys.readouterr().err
    assert not answers and not out.exists()

    progress.unlink()  # as the message says: the run starts over
    assert main(_args(questions, root, engines, out)) == 0
    assert len(answers) == NUM_QUESTIONS and not progress.exists()


def test_a_file_in_the_place_of_the_progress_file_is_not_ours_and_stays(data, engines, tmp_path, monkeypatch, capsys):
    questions, root = data
    out = tmp_path / "answers.json"
    progress = mcq.progress_path(out)
    progress.write_text("my notes\n")
    answers = _count_answers(monkeypatch)
    assert main(_args(questions, root, engines, out)) == 2
    err = capsys.readouterr().err
    assert f"{progress}: is in the way of the progress file and is not one `egovlp-deploy mcq` wrote" in err
    assert progress.read_text() == "my notes\n" and not out.exists() and not answers
    mcq.remove_progress(progress)  # nor is it deleted as a finished run's
    assert progress.read_text() == "my notes\n"


def test_damaged_video_in_the_background_is_the_serial_error_and_the_answers_before_it_stay(
    data, engines, reference, tmp_path, monkeypatch, capsys
):
    questions, good_root = data
    root = tmp_path / "videos"
    shutil.copytree(good_root, root)
    video = root / "vid_d" / "0.mp4"
    video.write_bytes(b"not a video")
    runtime = Runtime(engines)
    errors = {}
    for ahead in (0, 2):  # serial, background
        with pytest.raises(DataError) as caught:
            mcq.answer_mcq(questions, root, runtime, progress=False, decode_ahead=ahead)
        errors[ahead] = str(caught.value)
    assert errors[2] == errors[0]
    assert f"key '{BAD}'" in errors[2] and "choice 2, video vid_d" in errors[2]
    assert not _decoders_running()

    out = tmp_path / "answers.json"
    assert main(_args(questions, root, engines, out)) == 2
    assert errors[0] in capsys.readouterr().err
    progress = mcq.progress_path(out)
    assert len(progress.read_text().splitlines()) == 1 + int(BAD)  # the questions before the damaged video
    shutil.copyfile(good_root / "vid_d" / "0.mp4", video)  # the video is replaced: the same command resumes
    answers = _count_answers(monkeypatch)
    assert main(_args(questions, root, engines, out)) == 0
    assert f"resuming: {BAD} of {NUM_QUESTIONS} questions already answered" in capsys.readouterr().err
    assert len(answers) == NUM_QUESTIONS - int(BAD)
    assert out.read_bytes() == reference


def test_background_decoding_gives_the_serial_answers(data, engines, monkeypatch):
    questions, root = data
    runtime = Runtime(engines)
    decodes = _count_decodes(monkeypatch)
    serial = mcq.answer_mcq(questions, root, runtime, progress=False, decode_ahead=0)
    assert {thread for _, _, thread in decodes} == {threading.current_thread().name}
    decodes.clear()
    background = mcq.answer_mcq(questions, root, runtime, progress=False)
    assert {thread for _, _, thread in decodes} == {"egovlp-decode"}  # the engines ran in this thread meanwhile
    assert len(decodes) == 5 * NUM_QUESTIONS
    assert background == serial
    assert not _decoders_running()
