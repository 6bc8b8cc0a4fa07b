"""`egovlp-deploy eval --resume-dir DIR`: an interrupted evaluation (Ctrl-C, SIGTERM, out of memory, a preempted job)
keeps the chunks of scores / embeddings it committed, and the same command then encodes only what is missing and
prints exactly the numbers (and the load-failure counts) of an uninterrupted run. Another run's chunks (another
model, an edited annotation file) are refused, never mixed; a damaged, cut-short or uncommitted chunk is encoded
again, never trusted; files the run did not write are left alone."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import threading
import types

import pytest
import torch

pytest.importorskip("av")

from egovlp_deploy import eval_work, evaluation
from egovlp_deploy.cli import main
from egovlp_deploy.data import synth_downstream
from egovlp_deploy.model import EgoVLPv2
from official_format import saved_random_tiny
from training_cli import tiny_synth_data, two_ranks

QUESTIONS = 3  # --max-questions: 3 questions, one per batch
NOTE = re.compile(r"note: EgoMCQ: (\d+) of (\d+) clips could not be read")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_synth_data(tmp_path_factory.mktemp("synth_eval_resume") / "ds", seed=11, train_videos=1, eval_videos=3)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_eval_resume")
    return saved_random_tiny(root / "a", seed=3)[0], saved_random_tiny(root / "b", seed=4)[0]


@pytest.fixture
def commit_every_batch(monkeypatch):
    monkeypatch.setattr(eval_work, "COMMIT_ITEMS", 1)


def _quiet(argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `egovlp-deploy argv` run here (for module fixtures, which have no capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def egomcq(data, models, demo_tokenizer_dir, tmp_path_factory):
    """argv; the uninterrupted run's result (clean), raw scores (`Scores`) and predictions; `work`, the work folder
    of a run stopped after 2 of its 3 questions (batch size 1, chunks of one question)."""
    argv = _egomcq_args(models[0], demo_tokenizer_dir, data / "egomcq.json", data / "videos")
    folder = tmp_path_factory.mktemp("interrupted")
    with pytest.MonkeyPatch.context() as m:
        scores = Scores(m)
        code, out, _ = _quiet([*argv, "--predictions", str(folder / "clean_predictions.json")])
    assert code == 0
    work = folder / "work"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(eval_work, "COMMIT_ITEMS", 1)
        Stop(m, evaluation, "score_questions", 3)
        assert _quiet([*argv, "--resume-dir", str(work)])[0] == 130
    predictions = json.loads((folder / "clean_predictions.json").read_text())
    return types.SimpleNamespace(argv=argv, clean=json.loads(out), scores=scores, predictions=predictions, work=work)


class Scores:
    """What reaches `egomcq_accuracy` in a run (the score tensors of each mode, the answers and the types), to be
    compared bit for bit with another run's (`same_bits`)."""

    def __init__(self, monkeypatch):
        self.calls, real = [], evaluation.egomcq_accuracy

        def capture(scores, answers, kinds):
            self.calls.append(tuple(t.detach().clone() for t in (scores, answers, kinds)))
            return real(scores, answers, kinds)

        monkeypatch.setattr(evaluation, "egomcq_accuracy", capture)

    def same_bits(self, other: Scores) -> bool:
        def bits(t):
            return t.dtype, tuple(t.shape), t.contiguous().numpy().tobytes()

        flat = [bits(t) for call in self.calls for t in call]
        return len(self.calls) == 3 and flat == [bits(t) for call in other.calls for t in call]


def _egomcq_args(model, tokenizer, questions, videos, *extra):
    return [
        "eval",
        "--model",
        str(model),
        "--tokenizer",
        str(tokenizer),
        "--device",
        "cpu",
        "--egomcq",
        str(questions),
        "--video-root",
        str(videos),
        "--max-questions",
        str(QUESTIONS),
        "--batch-size",
        "1",
        "--lax",
        "--json",
        *extra,
    ]


class Stop:
    """Wraps `name` of `owner` to count its calls and raise KeyboardInterrupt (Ctrl-C) at call `at` (None: never)."""

    def __init__(self, monkeypatch, owner, name, at=None):
        self.calls, self.at, real = 0, at, getattr(owner, name)

        def wrapper(*args, **kwargs):
            self.calls += 1
            if self.at is not None and self.calls == self.at:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)


def _clean_egomcq(argv, tmp_path, capsys, monkeypatch):
    """(JSON result, predictions, load-failure note counts, raw scores) of an uninterrupted run without
    --resume-dir."""
    predictions = tmp_path / "clean_predictions.json"
    with monkeypatch.context() as m:
        scores = Scores(m)
        assert main([*argv, "--predictions", str(predictions)]) == 0
    out, err = capsys.readouterr()
    note = NOTE.search(err)
    return json.loads(out), json.loads(predictions.read_text()), note.groups() if note else None, scores


def _interrupt(monkeypatch, capsys, argv, at):
    """Run `argv`, interrupted at the `at`-th batch; returns its stderr."""
    with monkeypatch.context() as m:
        Stop(m, evaluation, "score_questions", at)
        assert main(argv) == 130
    return capsys.readouterr().err


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_interrupted_egomcq_eval_resumes_to_the_numbers_of_an_uninterrupted_run(
    data, models, demo_tokenizer_dir, tmp_path, monkeypatch, capsys, commit_every_batch
):
    videos = tmp_path / "videos"  # one of them damaged: --lax scores its clips as black clips (load_counts)
    shutil.copytree(data / "videos", videos)
    (videos / "synth_eval_0000" / "0.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 damaged")
    argv = _egomcq_args(models[0], demo_tokenizer_dir, data / "egomcq.json", videos)
    clean, clean_predictions, clean_note, clean_scores = _clean_egomcq(argv, tmp_path, capsys, monkeypatch)
    assert clean_note is not None and int(clean_note[0]) > 0  # the black clips are counted

    work, predictions = tmp_path / "work", tmp_path / "predictions.json"
    resumable = [*argv, "--resume-dir", str(work), "--predictions", str(predictions)]
    err = _interrupt(monkeypatch, capsys, resumable, at=3)  # two questions scored and committed, the third not
    assert "note: EgoMCQ: 2 of 3 questions are kept in" in err
    assert "with --resume-dir, the work committed so far is kept: rerun the same command to continue" in err
    record = json.loads((work / "egomcq" / "progress.json").read_text())
    assert [c["count"] for c in record["chunks"]] == [1, 1] and not predictions.exists()

    # the rerun decodes in DataLoader workers: the same numbers, the same black clips counted
    counter = Stop(monkeypatch, evaluation, "score_questions")
    scores = Scores(monkeypatch)
    assert main([*resumable, "--workers", "2"]) == 0
    out, err = capsys.readouterr()
    assert counter.calls == 1  # only the question not committed
    assert "resuming: 2 of 3 questions already encoded" in err and "--batch-size" not in err
    assert scores.same_bits(clean_scores)  # the scores themselves, not only the percentages printed
    assert json.loads(out) == clean
    assert json.loads(predictions.read_text()) == clean_predictions
    assert NOTE.search(err).groups() == clean_note
    assert list(work.iterdir()) == []  # the work is removed once the report is out


def test_ek100_and_charades_resume_to_the_numbers_of_an_uninterrupted_run(
    data, models, demo_tokenizer_dir, tmp_path, monkeypatch, capsys, commit_every_batch
):
    """6 EK-100 batches, then 2 Charades-Ego batches: stopped in EK-100 (at its 3rd batch), then in Charades-Ego."""
    argv = ["eval", "--model", str(models[0]), "--tokenizer", str(demo_tokenizer_dir), "--device", "cpu"]
    argv += ["--epic-mir", str(data / "epic"), "--charades", str(data / "charades"), "--frames", "2"]
    argv += ["--charades-classes", str(len(synth_downstream.charades_classes())), "--batch-size", "2", "--json"]
    assert main(argv) == 0
    clean = json.loads(capsys.readouterr().out)
    resumable = [*argv, "--resume-dir", str(tmp_path / "work")]
    with monkeypatch.context() as m:
        Stop(m, EgoVLPv2, "encode_video", 3)
        assert main(resumable) == 130
    assert "note: EK-100 MIR: 4 of 12 clips are kept in" in capsys.readouterr().err
    with monkeypatch.context() as m:  # EK-100's 4 batches left, then Charades-Ego's first, stopped at its second
        Stop(m, EgoVLPv2, "encode_video", 6)
        assert main(resumable) == 130
    err = capsys.readouterr().err
    assert "resuming: 4 of 12 clips already encoded" in err and "note: Charades-Ego: 2 of 3 clips are kept in" in err
    with monkeypatch.context() as m:
        counter = Stop(m, EgoVLPv2, "encode_video")
        assert main(resumable) == 0
    out, err = capsys.readouterr()
    assert counter.calls == 1 and "resuming: 12 of 12 clips" in err and "resuming: 2 of 3 clips" in err
    assert json.loads(out) == clean


def test_another_models_or_annotation_files_work_is_refused_not_mixed(
    data, models, demo_tokenizer_dir, tmp_path, monkeypatch, capsys, commit_every_batch
):
    questions = tmp_path / "egomcq.json"
    shutil.copy(data / "egomcq.json", questions)
    work = tmp_path / "work"
    argv = _egomcq_args(models[0], demo_tokenizer_dir, questions, data / "videos", "--resume-dir", str(work))
    _interrupt(monkeypatch, capsys, argv, at=2)
    kept = _files(work)
    assert "egomcq/chunk-00000.safetensors" in kept

    other_model = _egomcq_args(models[1], demo_tokenizer_dir, questions, data / "videos", "--resume-dir", str(work))
    other_frames = [*argv, "--frames", "2"]
    edited = json.loads(questions.read_text())
    edited["1"]["query"]["clip_text"] = "#C C opens a drawer"
    counter = Stop(monkeypatch, evaluation, "score_questions")
    for args, what in ((other_model, "another model"), (other_frames, "frames per clip (--frames) 4 there, 2 here")):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "the encoded chunks of another evaluation" in err and what in err
    questions.write_text(json.dumps(edited))
    assert main(argv) == 2
    assert "another annotation files (sha256)" in capsys.readouterr().err
    assert counter.calls == 0 and _files(work) == kept  # refused before any work, nothing touched

    (work / "egomcq" / "progress.json").write_text('{"not": "ours"}')
    assert main(argv) == 2
    assert "is not one `egovlp-deploy eval` wrote" in capsys.readouterr().err
    assert (work / "egomcq" / "progress.json").read_text() == '{"not": "ours"}'


def _flip_last_byte(path):
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0x01  # in the tensor data: the file still parses
    path.write_bytes(bytes(blob))


def _cut_short(path):
    path.write_bytes(path.read_bytes()[:-3])


def _symlink(path):
    """The chunk's own bytes, behind a link: its sha256 is right, but a link is never followed."""
    outside = path.parent.parent.parent / "elsewhere.safetensors"
    path.rename(outside)
    path.symlink_to(outside)


def _fifo(path):
    path.unlink()
    os.mkfifo(path)


def _size_recorded_otherwise(path):
    record_path = path.parent / "progress.json"
    record = json.loads(record_path.read_text())
    record["chunks"][int(path.stem.split("-")[1])]["bytes"] -= 1
    record_path.write_text(json.dumps(record))


@contextlib.contextmanager
def _fifo_writer(path):
    """A writer that unblocks a reader of the FIFO at `path` (some junk, then end of file), so that a run that opens
    it blocking fails the test instead of hanging it."""
    done = threading.Event()

    def unblock():
        while not done.wait(0.2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until a reader has it open
            except OSError:
                continue
            os.write(fd, b"junk")
            os.close(fd)
            return

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@pytest.mark.parametrize(
    "damage, chunk, redone, why",
    [
        (_flip_last_byte, 0, 3, "its sha256 is not the one recorded"),
        (_cut_short, 1, 2, "bytes, the record says"),
        (lambda path: path.unlink(), 1, 2, "missing"),
        (_symlink, 0, 3, "not a regular file"),
        (_fifo, 1, 2, "not a regular file"),
        (_size_recorded_otherwise, 0, 3, "bytes, the record says"),
    ],
    ids=["flipped-bit", "cut-short", "missing", "symlink", "fifo", "size-recorded-otherwise"],
)
def test_a_damaged_chunk_is_encoded_again_not_trusted(
    egomcq, tmp_path, monkeypatch, capsys, damage, chunk, redone, why
):
    """A chunk is read only as a regular file (a link is not followed, a FIFO or device not read) of the size its
    record gives, then checked against its sha256: any other is encoded again, with the chunks after it."""
    work = tmp_path / "work"
    shutil.copytree(egomcq.work, work)
    path = work / "egomcq" / f"chunk-{chunk:05d}.safetensors"
    damage(path)
    counter = Stop(monkeypatch, evaluation, "score_questions")
    scores = Scores(monkeypatch)
    with _fifo_writer(path) if damage is _fifo else contextlib.nullcontext():
        assert main([*egomcq.argv, "--resume-dir", str(work)]) == 0
    out, err = capsys.readouterr()
    assert f"chunk-{chunk:05d}.safetensors: " in err and why in err and "encoded again" in err
    assert counter.calls == redone
    assert json.loads(out) == egomcq.clean and scores.same_bits(egomcq.scores)


def _forge(folder, index, chunk):
    """Write `chunk` as chunk `index` of the record in `folder` (the next one: a new chunk), listed with its true
    size and sha256: a chunk intact as a file, which only its fit to the split can refuse."""
    record_path = folder / "progress.json"
    record = json.loads(record_path.read_text())
    chunks = record["chunks"]
    blob = b"".join(bytes(part) for part in chunk.file_parts())
    name = f"chunk-{index:05d}.safetensors"
    (folder / name).write_bytes(blob)
    start = sum(entry["count"] for entry in chunks[:index])
    entry = {"file": name, "start": start, "count": chunk.count, "bytes": len(blob), "batch_size": 1}
    entry["sha256"] = hashlib.sha256(blob).hexdigest()
    chunks[index : index + 1] = [entry]
    record_path.write_text(json.dumps(record))


def _chunk(folder, index):
    return eval_work.Chunk.from_bytes((folder / f"chunk-{index:05d}.safetensors").read_bytes())


@pytest.mark.parametrize(
    "misfit, redone, why",
    [
        ("past-the-split", 1, "items 2 to 3: the split has 3"),
        ("other-keys", 3, "its question keys are not those of the split's items there"),
        ("other-shape", 2, "columns [float32[4], float32[4], float32[4], int64[], int64[]], this run's are"),
        ("other-dtype", 2, "columns [float64[5]"),
    ],
)
def test_a_chunk_that_does_not_fit_the_split_is_encoded_again(
    egomcq, tmp_path, monkeypatch, capsys, misfit, redone, why
):
    """Chunks are read back only within the split, for EgoMCQ with the keys of its questions there, and with the
    columns' dtypes and shapes of this run's: any other is encoded again (with a note), never joined to the rest."""
    work = tmp_path / "work"
    shutil.copytree(egomcq.work, work)
    folder = work / "egomcq"
    first, second = _chunk(folder, 0), _chunk(folder, 1)
    if misfit == "past-the-split":  # 2 more items after the 2 kept: 4 of a split of 3
        _forge(folder, 2, eval_work.Chunk.merge([first, second]))
    elif misfit == "other-keys":
        _forge(folder, 0, eval_work.Chunk(first.columns, ["999"], first.failed, first.clips))
    else:
        scores = [c[:, :4] if misfit == "other-shape" else c.double() for c in second.columns[:3]]
        _forge(folder, 1, eval_work.Chunk((*scores, *second.columns[3:]), second.names, 0, second.clips))
    predictions = tmp_path / "predictions.json"
    counter = Stop(monkeypatch, evaluation, "score_questions")
    scores = Scores(monkeypatch)
    assert main([*egomcq.argv, "--resume-dir", str(work), "--predictions", str(predictions)]) == 0
    out, err = capsys.readouterr()
    assert why in err and "encoded again" in err
    assert counter.calls == redone
    assert json.loads(out) == egomcq.clean and scores.same_bits(egomcq.scores)
    assert json.loads(predictions.read_text()) == egomcq.predictions


def test_a_write_stopped_between_chunk_and_record_leaves_no_chunk_trusted(
    egomcq, tmp_path, monkeypatch, capsys, commit_every_batch
):
    """A kill after a chunk file is in place but before the record lists it (the commit point), and the temp file of
    a killed write: neither is read back; both are deleted, and a file of the user's in the folder stays."""
    argv, clean = egomcq.argv, egomcq.clean
    work = tmp_path / "work"
    resumable = [*argv, "--resume-dir", str(work)]
    real, writes = eval_work.EvalWork._write_record, []

    def write_record(self):
        writes.append(1)
        if len(writes) == 3:  # the record at start, after chunk 0, then the kill before chunk 1 is listed
            raise KeyboardInterrupt
        real(self)

    with monkeypatch.context() as m:
        m.setattr(eval_work.EvalWork, "_write_record", write_record)
        assert main(resumable) == 130
    capsys.readouterr()
    folder = work / "egomcq"
    assert (folder / "chunk-00001.safetensors").is_file()  # written, never committed
    assert [c["file"] for c in json.loads((folder / "progress.json").read_text())["chunks"]] == [
        "chunk-00000.safetensors"
    ]
    (folder / ".chunk-00002.safetensors.abcd1234.tmp").write_bytes(b"half a chunk")
    (folder / "notes.txt").write_text("the user's")
    counter = Stop(monkeypatch, evaluation, "score_questions")
    assert main(resumable) == 0
    assert json.loads(capsys.readouterr().out) == clean
    assert counter.calls == 2  # questions 2 and 3: the uncommitted chunk is not used
    assert _files(work) == {"egomcq/notes.txt": b"the user's"}  # ours removed, the user's kept (and its folder)


SHARDED_RESUME = """
import os
import sys
import torch
import torch.distributed as dist
from egovlp_deploy import eval_work, evaluation
dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_ADDR/PORT from the environment
eval_work.COMMIT_ITEMS = 1
items = [{"x": torch.tensor([float(i)]), "video": torch.zeros(1), "load_failed": torch.tensor(int(i == 5))}
         for i in range(7)]
calls = []
def encode(batch, stop=None):
    calls.append(len(batch["x"]))
    if stop is not None and len(calls) == stop:
        raise KeyboardInterrupt
    return (batch["x"] * 2,)
work = eval_work.EvalWork(sys.argv[1], "split", {"benchmark": "test"})
try:
    evaluation._encode_split(items, lambda b: encode(b, 2), 1, 0, False, "test", {}, work)  # stops on every rank
except KeyboardInterrupt:
    pass
del calls[:]
counts = {}
(whole,) = evaluation._encode_split(items, encode, 1, 0, False, "test", counts, work)
torch.save((whole, counts, len(calls)), f"{sys.argv[1]}/{os.environ['RANK']}.pt")
dist.destroy_process_group()
"""


def test_each_rank_resumes_its_own_shard(tmp_path):
    """Under torch.distributed every rank commits its share of the split to DIR/<name>/rank<R>-of-<W> and resumes
    from it; the split is gathered whole and in order, the load counts summed over the ranks (two gloo ranks)."""
    import sys

    import torch

    codes, errors = two_ranks([sys.executable, "-c", SHARDED_RESUME, str(tmp_path)], timeout=120)
    assert codes == [0, 0], errors
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["rank0-of-2", "rank1-of-2"]
    for rank in range(2):
        whole, counts, calls = torch.load(tmp_path / f"{rank}.pt")
        assert whole.flatten().tolist() == [2.0 * i for i in range(7)]
        assert calls == (3 if rank == 0 else 2)  # of 4 and 3 items, 1 committed before the stop
        assert counts["load_failures"] == 1 and counts["clips"] == 7 and counts["resumed_clips"] == 2
    eval_work.EvalWork(tmp_path, "split", {}).remove()
    assert not (tmp_path / "split").exists()


def test_the_batches_are_joined_once_not_counted_again_each_batch(tmp_path, monkeypatch):
    """Without --resume-dir (the trainer's validation too) the batches are kept and joined once at the end; with it
    the batches not committed yet are counted as they come: each batch's items are counted a bounded number of
    times, never once per later batch (which made a 20k-question evaluation at batch size 1 take minutes)."""
    items = [{"x": torch.tensor([float(i)]), "video": torch.zeros(1)} for i in range(400)]
    counted, real = [], eval_work.Chunk.count
    monkeypatch.setattr(eval_work.Chunk, "count", property(lambda chunk: counted.append(1) or real.fget(chunk)))
    (whole,) = evaluation._encode_split(items, lambda batch: (batch["x"] * 2,), 1, 0, False, "test", {})
    assert whole.flatten().tolist() == [2.0 * i for i in range(400)]
    assert len(counted) <= 2 * len(items)  # counted once per batch each time one came: 80 200

    counted.clear()
    monkeypatch.setattr(eval_work, "COMMIT_ITEMS", 16)
    work = eval_work.EvalWork(tmp_path, "split", {"benchmark": "test"})
    (whole,) = evaluation._encode_split(items, lambda batch: (batch["x"] * 2,), 1, 0, False, "test", {}, work)
    assert whole.flatten().tolist() == [2.0 * i for i in range(400)]
    assert len(counted) <= 4 * len(items)
    assert [c["count"] for c in json.loads((tmp_path / "split" / "progress.json").read_text())["chunks"]] == [16] * 25


def test_another_batch_size_is_resumed_with_a_note(egomcq, tmp_path, monkeypatch, capsys):
    """EgoMCQ pads each batch's narrations to its longest: an item's scores can differ in their last bits with the
    batch it is in. The record keeps the batch size of each chunk; a rerun at another says so."""
    work = tmp_path / "work"
    shutil.copytree(egomcq.work, work)
    assert {c["batch_size"] for c in json.loads((work / "egomcq" / "progress.json").read_text())["chunks"]} == {1}
    argv = [*egomcq.argv, "--resume-dir", str(work)]
    argv[argv.index("--batch-size") + 1] = "2"
    with monkeypatch.context() as m:
        Stop(m, evaluation, "score_questions", 1)  # stopped before its first batch: the chunks kept stay as they are
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert "resuming: 2 of 3 questions already encoded" in err
    assert (
        "note: EgoMCQ: the 2 questions kept were encoded at --batch-size 1, the rest is encoded at 2: the numbers "
        "may differ in the last digits from those of an uninterrupted run at either size"
    ) in err
    assert json.loads((work / "egomcq" / "progress.json").read_text())["batch_size"] == 2
    assert main([*egomcq.argv, "--resume-dir", str(work)]) == 0  # the same size as the chunks kept: no note
    out, err = capsys.readouterr()
    assert "resuming: 2 of 3" in err and "--batch-size" not in err and json.loads(out) == egomcq.clean


def _copy_tokenizer(source, target):
    """The tokenizer at `source`, its config written again with another indentation: the same tokenizer, other
    files (their sha256 is the tokenizer's identity)."""
    shutil.copytree(source, target)
    config = target / "tokenizer_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()), indent=3))
    return target


@pytest.mark.parametrize("change", ["tokenizer", "lax", "max-questions", "video-touched", "video-replaced"])
def test_each_identity_field_refuses_another_runs_work(
    data, models, demo_tokenizer_dir, egomcq, tmp_path, monkeypatch, capsys, change
):
    """Another tokenizer, --lax, --max-questions, or a video file the questions read that was written again (another
    modification time) or replaced (another size): refused before any work, naming what differs."""
    from egovlp_deploy.data.egomcq import EgoMCQDataset

    work, videos = tmp_path / "work", tmp_path / "videos"
    shutil.copytree(egomcq.work, work)
    shutil.copytree(data / "videos", videos, copy_function=shutil.copy2)
    argv = _egomcq_args(models[0], demo_tokenizer_dir, data / "egomcq.json", videos, "--resume-dir", str(work))
    record_path = work / "egomcq" / "progress.json"
    record = json.loads(record_path.read_text())
    record["run"]["video_root"] = str(videos.resolve())  # the interrupted run's, with its videos copied here
    record_path.write_text(json.dumps(record))
    dataset = EgoMCQDataset(data / "egomcq.json", videos, 4, 32)
    read = eval_work.split_videos(dataset, QUESTIONS)
    # copied with their sizes and modification times: the same fingerprint
    assert record["run"]["videos"] == eval_work.video_fingerprint(videos, read) and len(read) == 3
    assert record["run"]["torch"] == torch.__version__
    if change == "tokenizer":
        argv[argv.index("--tokenizer") + 1] = str(_copy_tokenizer(demo_tokenizer_dir, tmp_path / "tokenizer"))
        what = "another tokenizer (--tokenizer, sha256 of its files)"
    elif change == "lax":
        argv.remove("--lax")
        what = "--lax True there, False here"
    elif change == "max-questions":
        argv[argv.index("--max-questions") + 1] = "2"
        what = "--max-questions 3 there, 2 here"
    elif change == "video-touched":
        stat = (videos / read[1]).stat()
        os.utime(videos / read[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        what = "another video files (the names, sizes and modification times of those the split reads)"
    else:
        stat = (videos / read[2]).stat()
        with open(videos / read[2], "ab") as f:
            f.write(b"\0")
        os.utime(videos / read[2], ns=(stat.st_atime_ns, stat.st_mtime_ns))  # only the size tells
        what = "another video files"
    kept = _files(work)
    counter = Stop(monkeypatch, evaluation, "score_questions")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the encoded chunks of another evaluation" in err and what in err
    assert counter.calls == 0 and _files(work) == kept


def test_the_video_fingerprint_stats_each_file_once(tmp_path, monkeypatch):
    """About the full EgoMCQ set's size: 40k questions of 5 clips (200k clips) reading 10k chunk files, one stat
    each, no byte read; a missing file is recorded as missing."""
    row = types.SimpleNamespace

    def question(q):  # 2500 videos of 4 chunks, each clip within one chunk
        start = 600.0 * (q // 500 % 4)
        clips = [row(video_uid=f"v{(q * 5 + c) % 2500}", start_sec=start + c, end_sec=start + 9) for c in range(5)]
        return row(choices=clips)

    entries = [question(q) for q in range(40_000)]
    dataset = row(entries=entries)
    names = eval_work.split_videos(dataset, len(entries))
    assert len(names) == 10_000 and names[0] == "v0/0.mp4"
    (tmp_path / "v0").mkdir()
    (tmp_path / "v0" / "0.mp4").write_bytes(b"a video")
    stats, real = [], os.stat
    monkeypatch.setattr(eval_work.os, "stat", lambda path, *a, **k: stats.append(path) or real(path, *a, **k))
    fingerprint = eval_work.video_fingerprint(tmp_path, names)
    assert len(stats) == len(set(stats)) == 10_000 and fingerprint["files"] == 10_000
    (tmp_path / "v0" / "0.mp4").write_bytes(b"a video, downloaded again")
    assert eval_work.video_fingerprint(tmp_path, names) != fingerprint
    (tmp_path / "v0" / "0.mp4").unlink()
    assert eval_work.video_fingerprint(tmp_path, names) != fingerprint


def _downstream_args(models, tokenizer, data, *extra):
    argv = ["eval", "--model", str(models[0]), "--tokenizer", str(tokenizer), "--device", "cpu", "--frames", "2"]
    argv += ["--epic-mir", str(data / "epic"), "--charades", str(data / "charades")]
    return [*argv, "--charades-classes", str(len(synth_downstream.charades_classes())), "--json", *extra]


@pytest.mark.parametrize("benchmark, what", [("charades", "a file"), ("epic_mir", "a symbolic link")])
def test_a_file_or_link_where_a_benchmarks_work_goes_is_refused_before_any_work(
    data, models, demo_tokenizer_dir, tmp_path, monkeypatch, capsys, benchmark, what
):
    work = tmp_path / "work"
    work.mkdir()
    if what == "a file":
        (work / benchmark).write_text("the user's")
    else:
        (tmp_path / "elsewhere").mkdir()
        (work / benchmark).symlink_to(tmp_path / "elsewhere")
    counter = Stop(monkeypatch, EgoVLPv2, "encode_video")
    assert main(_downstream_args(models, demo_tokenizer_dir, data, "--resume-dir", str(work))) == 2
    err = capsys.readouterr().err
    assert f"{work / benchmark}: is {what}, where this evaluation keeps its work (a folder)" in err
    assert counter.calls == 0  # before EK-100 MIR runs, not after
    assert sorted(p.name for p in work.iterdir()) == [benchmark]
    assert what == "a file" or not list((tmp_path / "elsewhere").iterdir())


def test_resume_dir_as_a_file_and_a_second_run_on_the_same_folder_are_refused(egomcq, tmp_path, capsys):
    from egovlp_deploy.folder_lock import exclusive_writer

    a_file = tmp_path / "work"
    a_file.write_text("the user's")
    assert main([*egomcq.argv, "--resume-dir", str(a_file)]) == 2
    assert f"--resume-dir {a_file}: exists and is not a folder" in capsys.readouterr().err
    assert a_file.read_text() == "the user's"

    work = tmp_path / "busy"
    shutil.copytree(egomcq.work, work)
    kept = _files(work)
    with exclusive_writer(work, "eval work folder", RuntimeError):  # another run working there now
        assert main([*egomcq.argv, "--resume-dir", str(work)]) == 2
    assert "another process is writing this eval work folder now" in capsys.readouterr().err
    assert _files(work) == kept


def test_a_finished_benchmark_and_one_stopped_mid_way_resume_to_the_uninterrupted_numbers(
    data, models, demo_tokenizer_dir, tmp_path, monkeypatch, capsys
):
    """EgoMCQ finishes (its last chunk the 1 question after a chunk of 2), EK-100 MIR is stopped at its 3rd batch
    (one chunk of 2 clips committed, the 3rd clip not): the rerun reads EgoMCQ back whole, with its last, shorter
    chunk, encodes EK-100 from its 3rd clip, and prints the uninterrupted run's numbers from the same scores."""
    monkeypatch.setattr(eval_work, "COMMIT_ITEMS", 2)
    argv = _egomcq_args(models[0], demo_tokenizer_dir, data / "egomcq.json", data / "videos", "--frames", "2")
    argv += ["--epic-mir", str(data / "epic")]
    with monkeypatch.context() as m:
        clean_scores = Scores(m)
        assert main(argv) == 0
    clean = json.loads(capsys.readouterr().out)
    work = tmp_path / "work"
    with monkeypatch.context() as m:
        Stop(m, EgoVLPv2, "encode_video", QUESTIONS + 3)  # EgoMCQ encodes its videos once per batch
        assert main([*argv, "--resume-dir", str(work)]) == 130
    err = capsys.readouterr().err
    assert "note: EK-100 MIR: 2 of 12 clips are kept in" in err
    record = json.loads((work / "egomcq" / "progress.json").read_text())
    assert [c["count"] for c in record["chunks"]] == [2, 1]
    with monkeypatch.context() as m:
        questions, clips = Stop(m, evaluation, "score_questions"), Stop(m, EgoVLPv2, "encode_video")
        scores = Scores(m)
        assert main([*argv, "--resume-dir", str(work)]) == 0
    out, err = capsys.readouterr()
    assert "resuming: 3 of 3 questions already encoded" in err and "resuming: 2 of 12 clips already encoded" in err
    assert questions.calls == 0 and clips.calls == 10
    assert json.loads(out) == clean and scores.same_bits(clean_scores)
    assert list(work.iterdir()) == []  # the work is removed once the report is out


@pytest.mark.parametrize("chunks", [False, True])
def test_a_record_of_another_version_is_started_over_without_chunks_and_refused_with_them(
    egomcq, tmp_path, capsys, chunks
):
    work = tmp_path / "work"
    shutil.copytree(egomcq.work, work)
    record_path = work / "egomcq" / "progress.json"
    record = json.loads(record_path.read_text())
    record["version"] = eval_work.WORK_VERSION + 1
    if not chunks:
        record["chunks"] = []
    record_path.write_text(json.dumps(record))
    code = main([*egomcq.argv, "--resume-dir", str(work)])
    out, err = capsys.readouterr()
    if chunks:
        assert code == 2 and "progress of another version of egovlp-deploy" in err
        assert json.loads(record_path.read_text()) == record
    else:
        assert code == 0 and json.loads(out) == egomcq.clean and "resuming" not in err


def test_removal_deletes_the_record_first(tmp_path, monkeypatch):
    """A kill part way through the removal leaves chunks that no record lists (the next run deletes them), never a
    record that lists chunks no longer there."""
    work = eval_work.EvalWork(tmp_path, "split", {"benchmark": "test"})
    work.resume(2, "clips", "test", 1)
    for i in range(2):
        work.commit(eval_work.Chunk((torch.tensor([[float(i)]]),), None, 0, 1))
    unlinked, real = [], eval_work.Path.unlink

    def unlink(path, *args, **kwargs):
        unlinked.append(path.name)
        real(path, *args, **kwargs)
        if len(unlinked) == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(eval_work.Path, "unlink", unlink)
        with pytest.raises(KeyboardInterrupt):
            work.remove()
    assert unlinked[0] == "progress.json" and not (tmp_path / "split" / "progress.json").exists()
    again = eval_work.EvalWork(tmp_path, "split", {"benchmark": "test"})
    assert again.resume(2, "clips", "test", 1) == [] and sorted(p.name for p in (tmp_path / "split").iterdir()) == [
        "progress.json"
    ]


SHARDED_REFUSAL = """
import os
import sys
import torch
import torch.distributed as dist
from egovlp_deploy import eval_work, evaluation
dist.init_process_group("gloo")
rank = int(os.environ["RANK"])
root = f"{sys.argv[1]}/node{rank}"  # a folder of each node's own disk: rank 1's holds another run's work
if rank == 1:
    stale = eval_work.EvalWork(root, "split", {"benchmark": "another"}).for_rank(1, 2)
    stale.resume(3, "clips", "test", 1)
    stale.commit(eval_work.Chunk((torch.zeros(1, 1),), None, 0, 1))
items = [{"x": torch.tensor([float(i)]), "video": torch.zeros(1)} for i in range(7)]
calls = []
try:
    evaluation._encode_split(items, lambda b: calls.append(1) or (b["x"],), 1, 0, False, "test", {},
                             eval_work.EvalWork(root, "split", {"benchmark": "test"}))
    outcome = "ran"
except ValueError as exc:
    outcome = str(exc)
torch.save((outcome, len(calls)), f"{sys.argv[1]}/{rank}.pt")
dist.destroy_process_group()
"""


def test_a_refusal_on_one_rank_is_raised_on_every_rank(tmp_path):
    """Each rank checks its work (the ranks' folders, rank<R>-of-<W>) before any, and where one rank refuses, all
    raise the same error: none is left waiting in a collective for it (two gloo ranks, each with its own DIR)."""
    import sys

    codes, errors = two_ranks([sys.executable, "-c", SHARDED_REFUSAL, str(tmp_path)], timeout=120)
    assert codes == [0, 0], errors
    for rank in range(2):
        outcome, calls = torch.load(tmp_path / f"{rank}.pt")
        assert f"{tmp_path / 'node1' / 'split' / 'rank1-of-2'}: the encoded chunks of another evaluation" in outcome
        assert "benchmark 'another' there, 'test' here" in outcome and calls == 0
