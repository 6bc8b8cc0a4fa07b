"""`egovlp-deploy eval` as researchers run it on real files: question counts past the end of the file, lax runs
with missing and damaged videos, a question given twice, an answers file that names the questions file or lies in
the model folder or behind a symlink, and a header that says whether the model was fine-tuned on the benchmark it
reports."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("av")

from egovlp_deploy.cli import main
from egovlp_deploy.data import DataError, EpicMIRDataset
from egovlp_deploy.data.egomcq import EgoMCQDataset
from egovlp_deploy.evaluation import load_failure_note, skipped_note
from egovlp_deploy.trainer.evaluate import regime
from egovlp_deploy.trainer.training_state import save_checkpoint
from official_format import random_tiny, saved_random_tiny
from training_cli import tiny_synth_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_eval_cli") / "ds"
    return tiny_synth_data(out, seed=11, train_videos=1, eval_videos=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_random_tiny(tmp_path_factory.mktemp("tiny_eval_cli") / "tiny", seed=3)[0]


def _questions(data, tmp_path, keys, edit=None):
    """The first synthetic questions under `keys` (new key: old key), optionally edited, as a new file."""
    questions = json.loads((data / "egomcq.json").read_text())
    out = {new: questions[old] for new, old in keys.items()}
    if edit:
        edit(out)
    path = tmp_path / "egomcq.json"
    path.write_text(json.dumps(out))
    return path


def _egomcq(model, tokenizer, questions, videos, *extra):
    argv = ["eval", "--model", str(model), "--tokenizer", str(tokenizer), "--device", "cpu"]
    return main([*argv, "--egomcq", str(questions), "--video-root", str(videos), *extra])


def test_max_questions_past_the_end_reports_the_questions_scored(data, model_dir, demo_tokenizer_dir, tmp_path, capsys):
    questions = _questions(data, tmp_path, {"0": "0", "1": "1"})
    assert _egomcq(model_dir, demo_tokenizer_dir, questions, data / "videos", "--max-questions", "50") == 0
    assert "EgoMCQ on 2 questions, 4 frames" in capsys.readouterr().out  # not "on 50 questions"


def _lax_case(data, tmp_path) -> tuple[Path, Path, int]:
    """(questions, videos, black clips): question 2's first choice names a missing video, and the video of
    synth_eval_0001 cannot be decoded."""
    videos = tmp_path / "videos"
    shutil.copytree(data / "videos", videos)
    (videos / "synth_eval_0001" / "0.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 damaged")

    def missing_video(questions):
        questions["2"]["choices"]["0"]["video_uid"] = "not_there"

    questions = _questions(data, tmp_path, {"0": "0", "1": "1", "2": "2"}, missing_video)
    used = json.loads(questions.read_text())
    black = sum(c["video_uid"] == "synth_eval_0001" for k in ("0", "1") for c in used[k]["choices"].values())
    assert black
    return questions, videos, black


def test_lax_run_says_which_questions_it_left_out_and_which_clips_it_scored_black(
    data, model_dir, demo_tokenizer_dir, tmp_path, capsys
):
    """A question whose video is missing is skipped and an undecodable video scored as the black clip: both change
    the accuracy, and the run says so (before, only the smaller question count hinted at the first)."""
    questions, videos, black = _lax_case(data, tmp_path)
    assert _egomcq(model_dir, demo_tokenizer_dir, questions, videos, "--lax", "--json") == 0
    err = capsys.readouterr().err
    assert "note: EgoMCQ: 1 of 3 questions skipped (missing video: 1)" in err
    assert f"note: EgoMCQ: {black} of 10 clips could not be read and were scored as black clips" in err


def test_workers_decode_the_clips_to_the_same_results_and_count_the_black_ones(
    data, model_dir, demo_tokenizer_dir, tmp_path, capsys
):
    """`--workers N` decodes in DataLoader processes (the full EgoMCQ set is about 200k clips, which one process
    decodes far slower than a GPU scores them): the same accuracies, and the black clips, counted in the workers
    where the main process never sees them, still in the note."""
    questions, videos, black = _lax_case(data, tmp_path)
    results = []
    for workers in ("0", "2"):
        assert _egomcq(model_dir, demo_tokenizer_dir, questions, videos, "--lax", "--json", "--workers", workers) == 0
        out, err = capsys.readouterr()
        results.append(json.loads(out))
        assert f"note: EgoMCQ: {black} of 10 clips could not be read and were scored as black clips" in err
    assert results[0] == results[1]
    assert "read in DataLoader workers" in err


@pytest.mark.parametrize(
    "text, key, why",
    [
        ('{{"0": {q0}, "1": {q1}, "1": {q0}}}', "'1'", "the key is given 2 times"),
        ('{{"0": {q0}, "1": {q1}, "01": {q0}}}', "'01'", "keys ['1', '01'] give the same question number"),
    ],
)
def test_a_question_given_twice_is_not_silently_the_last_copy(data, tmp_path, text, key, why):
    """Python's json keeps the last copy of a repeated key: one of the two questions vanished from the count."""
    questions = json.loads((data / "egomcq.json").read_text())
    path = tmp_path / "egomcq.json"
    path.write_text(text.format(q0=json.dumps(questions["0"]), q1=json.dumps(questions["1"])))
    with pytest.raises(DataError, match=rf"key {key}: repeated question: .*{re.escape(why)}") as caught:
        EgoMCQDataset(path, data / "videos", 2, 32)
    assert len(str(caught.value).splitlines()) == 1
    lax = EgoMCQDataset(path, data / "videos", 2, 32, strict=False)
    assert [e.key for e in lax.entries] == ["0"] and lax.skip_counts == {"repeated question": 2}
    assert skipped_note("EgoMCQ", lax, "questions").startswith("note: EgoMCQ: 2 of 3 questions skipped")


def test_a_field_given_twice_in_a_question_is_a_bad_entry(data, tmp_path):
    questions = json.loads((data / "egomcq.json").read_text())
    entry = json.dumps(questions["0"])
    path = tmp_path / "egomcq.json"
    path.write_text('{"0": ' + entry[:-1] + ', "answer": 4}}')  # "answer" twice: which one is the answer?
    with pytest.raises(DataError, match=r"key '0': repeated field: 'answer' is given more than once"):
        EgoMCQDataset(path, data / "videos", 2, 32)


def test_predictions_that_name_the_questions_file_are_refused_before_the_run(
    data, demo_tokenizer_dir, tmp_path, capsys
):
    questions = _questions(data, tmp_path, {"0": "0"})
    before = questions.read_bytes()
    args = ("--predictions", str(questions))  # random:huge: refused before any model would load
    assert _egomcq("random:huge", demo_tokenizer_dir, questions, data / "videos", *args) == 2
    assert "is the --egomcq file; name another file" in capsys.readouterr().err
    assert questions.read_bytes() == before


def _run(tmp_path, name, task, init_from=None):
    return save_checkpoint(
        tmp_path / name / "checkpoints", 1, random_tiny(3), {}, {"task": task, "model": {"init_from": init_from}}
    )


def test_the_header_says_fine_tuned_for_a_model_fine_tuned_on_the_benchmark(data, demo_tokenizer_dir, tmp_path, capsys):
    pretrained = _run(tmp_path, "pretrain", "pretrain")
    fine_tuned = _run(tmp_path, "epic", "epic_mir", init_from=str(pretrained))
    argv = ["eval", "--model", str(tmp_path / "epic"), "--tokenizer", str(demo_tokenizer_dir), "--device", "cpu"]
    assert main([*argv, "--epic-mir", str(data / "epic"), "--frames", "4", "--batch-size", "12"]) == 0
    assert "EK-100 MIR (fine-tuned on EK-100 MIR) on 12 clips, 4 frames" in capsys.readouterr().out

    assert regime({"kind": "trainer", "path": str(pretrained)}, "epic_mir") == "zero-shot"
    assert regime({"kind": "trainer", "path": str(fine_tuned)}, "charades") == "zero-shot"  # EK-100 only
    again = _run(tmp_path, "more", "pretrain", init_from=str(tmp_path / "epic"))  # pre-trained further
    assert regime({"kind": "trainer", "path": str(again)}, "epic_mir") == "fine-tuned on EK-100 MIR"
    unknown = _run(tmp_path, "from_pth", "pretrain", init_from=str(tmp_path / "gone.pth"))
    for source in ({"kind": "trainer", "path": str(unknown)}, {"kind": "official", "path": str(tmp_path)}):
        assert regime(source, "charades").startswith("zero-shot if not fine-tuned on it")
    assert regime({"kind": "random", "path": "random:tiny"}, "charades") == "random weights"


EPIC_HEADER = (
    "narration_id,participant_id,video_id,narration_timestamp,start_timestamp,stop_timestamp,start_frame,"
    "stop_frame,narration,verb,verb_class,noun,noun_class,all_nouns,all_noun_classes"
)


def _epic_row(nid: str, text: str, vid: str = "P01_01") -> str:
    return f"{nid},P01,{vid},00:00:01.00,00:00:00.50,00:00:02.50,5,25,{text},open,3,drawer,8,\"['drawer']\",[8]"


def test_lax_sentence_id_that_names_no_row_is_counted_in_the_note(tmp_path):
    """A sentence whose id names no row of the test CSV (skipped or not) is embedded from its own text in lax mode:
    the note counts it apart from the sentences of skipped rows."""
    (tmp_path / "videos" / "P01").mkdir(parents=True)
    (tmp_path / "videos" / "P01" / "P01_01.MP4").write_bytes(b"a video")  # never decoded
    rows = [_epic_row("P01_01_0", "open drawer", vid="P01_99"), _epic_row("P01_01_1", "open drawer")]
    csv = tmp_path / "test.csv"
    csv.write_text("\n".join([EPIC_HEADER, *rows, _epic_row("P01_01_2", "close tap")]) + "\n")
    sentences = tmp_path / "sentences.csv"  # P01_01_7 names no row
    sentences.write_text("narration_id,narration\nP01_01_0,open drawer\nP01_01_7,close tap\n")
    np.save(tmp_path / "relevancy.npy", np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32))
    ds = EpicMIRDataset(
        csv, tmp_path / "videos", 2, 16, sentence_csv=sentences, relevancy_path=tmp_path / "relevancy.npy", strict=False
    )
    assert ds.sentence_items == [None, None] and ds.unknown_sentences == ["P01_01_7"]
    note = skipped_note("EK-100 MIR", ds)
    assert note.startswith("note: EK-100 MIR: 1 of 3 test rows skipped (missing video: 1)")
    assert "1 scored sentence ids name no row of the test CSV" in note and "'P01_01_7'" in note


def _model_copy(model_dir, tmp_path, kind):
    """(--model, a folder inside it): a save_pretrained folder, or a trainer run folder and its checkpoint."""
    if kind == "run":
        checkpoint = _run(tmp_path, "run", "pretrain")
        return tmp_path / "run", checkpoint
    shutil.copytree(model_dir, tmp_path / "tiny")
    return tmp_path / "tiny", tmp_path / "tiny"


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "kind, where",
    [
        ("pretrained", "model.safetensors"),  # the weights themselves
        ("pretrained", "answers.json"),  # a new file in the model folder
        ("pretrained", "link/answers.json"),  # the model folder under another name
        ("run", "answers.json"),  # inside a run folder's checkpoint
    ],
)
def test_predictions_inside_the_model_folder_are_refused_before_the_run(
    data, model_dir, demo_tokenizer_dir, tmp_path, capsys, kind, where
):
    model, inside = _model_copy(model_dir, tmp_path, kind)
    (tmp_path / "link").symlink_to(inside)
    predictions = tmp_path / where if where.startswith("link/") else inside / where
    before = _contents(model)
    questions = _questions(data, tmp_path, {"0": "0"})
    assert _egomcq(model, demo_tokenizer_dir, questions, data / "videos", "--predictions", str(predictions)) == 2
    err = capsys.readouterr().err
    assert f"--predictions {predictions}: is inside the --model folder {model}; name a file outside it" in err
    assert _contents(model) == before


def _read_only(monkeypatch, folder):
    """os.access says `folder` cannot be written (a chmod would not show it: root may write anywhere)."""
    access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: Path(path).resolve() != folder.resolve() and access(path, mode)
    )


def test_predictions_are_checked_in_the_folder_the_writer_uses_not_in_a_links_target(
    demo_tokenizer_dir, tmp_path, capsys, monkeypatch
):
    """atomic_write_bytes makes its temp file next to the path given and renames it over a link there: a link in a
    read-only folder cannot be written though its target's folder is writable, and the reverse can."""
    (tmp_path / "ro").mkdir()
    (tmp_path / "rw").mkdir()
    (tmp_path / "q.json").write_text("{}")
    in_ro, in_rw = tmp_path / "ro" / "answers.json", tmp_path / "rw" / "answers.json"
    in_ro.symlink_to(tmp_path / "rw" / "old.json")
    in_rw.symlink_to(tmp_path / "ro" / "old.json")
    _read_only(monkeypatch, tmp_path / "ro")
    argv = ["eval", "--model", "random:huge", "--tokenizer", str(demo_tokenizer_dir)]  # the model fails later
    argv += ["--egomcq", str(tmp_path / "q.json"), "--video-root", str(tmp_path), "--predictions"]
    assert main([*argv, str(in_ro)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--predictions {in_ro}: its folder is not writable")
    assert main([*argv, str(in_rw)]) == 2
    err = capsys.readouterr().err
    assert "'random:huge'" in err and "--predictions" not in err  # past the check: the model is what fails


def test_a_malformed_rows_narration_id_is_no_unknown_sentence_id(tmp_path):
    """A row with too few fields is skipped as malformed: its id names a row of the CSV all the same, so the note
    counts it once, as a skipped row, not also as a sentence id that names no row."""
    (tmp_path / "videos" / "P01").mkdir(parents=True)
    (tmp_path / "videos" / "P01" / "P01_01.MP4").write_bytes(b"a video")  # never decoded
    malformed = _epic_row("P01_01_0", "open drawer").rsplit(",", 2)[0]  # 13 of 15 fields
    csv = tmp_path / "test.csv"
    rows = [malformed, _epic_row("P01_01_1", "open drawer"), _epic_row("P01_01_2", "close tap")]
    csv.write_text("\n".join([EPIC_HEADER, *rows]) + "\n")
    sentences = tmp_path / "sentences.csv"
    sentences.write_text("narration_id,narration\nP01_01_0,open drawer\nP01_01_2,close tap\n")
    np.save(tmp_path / "relevancy.npy", np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32))
    ds = EpicMIRDataset(
        csv, tmp_path / "videos", 2, 16, sentence_csv=sentences, relevancy_path=tmp_path / "relevancy.npy", strict=False
    )
    assert ds.skip_counts == {"malformed row": 1} and ds.unknown_sentences == []
    note = skipped_note("EK-100 MIR", ds)
    assert note.startswith("note: EK-100 MIR: 1 of 3 test rows skipped (malformed row: 1)")
    assert "name no row" not in note


def test_the_load_failure_note_needs_only_what_the_dataset_exposes(tmp_path):
    (tmp_path / "videos" / "P01").mkdir(parents=True)
    (tmp_path / "videos" / "P01" / "P01_01.MP4").write_bytes(b"not a video")  # every clip is a black clip
    csv = tmp_path / "test.csv"
    csv.write_text("\n".join([EPIC_HEADER, _epic_row("P01_01_0", "open drawer")]) + "\n")
    ds = EpicMIRDataset(csv, tmp_path / "videos", 2, 16, strict=False)
    ds[0]
    assert ds.clip_loads == 1 and sum(ds.failures.values()) == 1 and len(ds.first_errors) == 1
    public = SimpleNamespace(failures=ds.failures, first_errors=ds.first_errors, clip_loads=ds.clip_loads)
    note = load_failure_note("EK-100 MIR", public)
    assert note == load_failure_note("EK-100 MIR", ds)
    assert note.startswith("note: EK-100 MIR: 1 of 1 clips could not be read and were scored as black clips")
