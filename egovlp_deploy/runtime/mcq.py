"""EgoMCQ-style answering on the runtime: a narration and C candidate clips, pick the clip that shows it.

Input: the official EgoMCQ JSON (`{"0": {"types", "query": {clip_text...}, "choices": {"0": {video_uid,
clip_start, clip_end...}, ...}, "answer"}}`, `answer` optional here) with videos in the EgoClip chunked layout
(ROOT/<video_uid>/<chunk>.mp4). Each choice is read as the official evaluation reads it ('uniform' sampling of the
engine's F frames, eval transform), so the scores equal `egovlp-deploy eval` on the same checkpoint.

The file is read and checked by the EgoMCQ reader `egovlp-deploy eval` uses (data/egomcq.py), before any video is
read: a file one of them rejects, the other rejects with the same DataError naming the question's key. The one
difference: a question may leave out `answer` here (it is answered, not scored).

Scores per choice come from `evaluation.choice_scores` and the accuracy from `metrics.egomcq_accuracy`, the two
functions `egovlp-deploy eval` uses: dual (cosine of the projected embeddings), fusion (VTM match probability over the
clip's and the narration's prefixes) and ensemble (their sum).

The next questions' clips are decoded and preprocessed in a background thread (`in_background`, DECODE_AHEAD
questions ahead) while the engines answer the current one. With a progress file (`mcq --out FILE`:
FILE.partial.jsonl, `Progress`) each answer is recorded as it is made, and a rerun of the same run (`run_identity`)
answers only the questions not recorded: the full EgoMCQ set is 40,000 questions, and a run stopped near the end
keeps what it did.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..data.errors import DataError
from ..decoding import VideoReadError, read_egoclip_clip, resolve_backend
from ..evaluation import MODES, choice_scores
from ..metrics import egomcq_accuracy
from .clip_pipeline import ClipPipeline, in_background
from .engines import QueryError, Runtime

NUM_CHOICES = 5  # EgoMCQ's, as `egovlp-deploy eval` requires
ROLES = ("text_encoder", "video_encoder", "video_fusion_prefix", "fusion_head")  # in the order a question uses them
DECODE_AHEAD = 2  # questions decoded (5 preprocessed clips each) ahead of the one the engines run
PROGRESS_SUFFIX = ".partial.jsonl"  # beside --out FILE: the answers recorded so far, one question a line
PROGRESS_FORMAT = "egovlp-deploy mcq progress"
PROGRESS_VERSION = 1


def _load_questions(path: str | Path, video_root: str | Path | None = None) -> list[dict]:
    """The questions in key order, each {key, text, choices: [(video_uid, start, end)], answer, type}; raises
    DataError (strict) on the first bad entry and when a choice's video chunk is missing under `video_root`."""
    from ..data.egoclip import NUM_NOUNS, NUM_VERBS
    from ..data.egomcq import read_egomcq
    from ..data.errors import RowFilter

    if not Path(path).is_file():
        raise ValueError(f"{path}: no such questions file")
    rows = RowFilter(path, strict=True)
    entries = read_egomcq(path, video_root, NUM_CHOICES, NUM_VERBS, NUM_NOUNS, rows, require_answer=False)
    if not entries:
        raise rows.fail("all entries", "no question (expected an EgoMCQ object keyed '0', '1', ...)")
    return [
        {
            "key": e.key,
            "text": e.text,
            "choices": [(c.video_uid, c.start_sec, c.end_sec) for c in e.choices],
            "answer": e.answer,
            "type": e.type,
        }
        for e in entries
    ]


def _read_choice(questions_json, video_root, q: dict, i: int, frames: int, backend: str) -> np.ndarray:
    """Choice i's clip, F frames sampled as the official evaluation samples them; a video that cannot be read is a
    DataError naming the question and the choice, as `egovlp-deploy eval` reports it."""
    uid, start, end = q["choices"][i]
    try:
        return read_egoclip_clip(video_root, uid, start, end, frames, "uniform", backend=backend).numpy()
    except VideoReadError as exc:
        raise DataError(questions_json, f"key {q['key']!r}", f"choice {i}, video {uid}: {exc}") from exc


def _float32(array: np.ndarray) -> torch.Tensor:
    """An engine output as a float32 tensor (fp16 engines answer in float16)."""
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


def _question_clips(
    questions_json, video_root, questions: list[dict], todo: list[int], pipe: ClipPipeline, frames: int, backend: str
) -> Iterator[tuple[int, np.ndarray]]:
    """(i, float32 clips (C, F, 3, S, S)) for each question i of `todo`, in order. Each choice is preprocessed as soon
    as it is decoded: choices come from videos of any size, and only one choice's full-size frames are held at a
    time."""
    for i in todo:
        q = questions[i]
        decoding, clips = 0.0, []
        for c in range(len(q["choices"])):
            t = time.perf_counter()
            decoded = _read_choice(questions_json, video_root, q, c, frames, backend)
            decoding += time.perf_counter() - t
            clips.append(pipe.preprocess(torch.from_numpy(decoded[None]))[0])
            del decoded
        pipe.times.add("decode", decoding, len(clips))
        yield i, np.stack(clips)


def _scores(runtime: Runtime, ids: np.ndarray, mask: np.ndarray, clips: np.ndarray) -> dict[str, torch.Tensor]:
    """One question's float32 (C,) scores per mode."""
    text = runtime.text_encoder.encode_tokens(ids, mask)
    video = runtime.video_encoder.encode(clips)
    match = runtime.fusion.score_prefixes(runtime.video_encoder.fusion_prefix(clips), text.prefix[:1], text.mask[:1])
    scores = choice_scores(_float32(text.embedding[:1]), _float32(video)[None], _float32(match)[None])
    return {m: s[0] for m, s in scores.items()}


def _result(q: dict, scores: dict[str, torch.Tensor]) -> dict:
    return {
        "key": q["key"],
        "text": q["text"],
        "answer": q["answer"],
        "type": q["type"],
        "predicted": {m: int(torch.argmax(s)) for m, s in scores.items()},
        "scores": {m: [round(float(x), 5) for x in s] for m, s in scores.items()},
    }


def answer_mcq(
    questions_json: str | Path,
    video_root: str | Path,
    runtime: Runtime,
    max_questions: int | None = None,
    progress: bool = True,
    decode_backend: str = "auto",
    progress_file: str | Path | None = None,
    decode_ahead: int = DECODE_AHEAD,
) -> dict:
    """The summary {questions, seconds, backend, accuracy, results} of the first `max_questions` questions (None:
    all), `results` in question order.

    progress_file: each answer is recorded there as it is made (`Progress`), and the questions an earlier run of
    the same identity (`run_identity`) recorded there are not answered again: the summary is the one an uninterrupted
    run gives, with `seconds` the answering time of all the runs. The caller deletes the file (`remove_progress`)
    once it has written the summary. decode_ahead: questions whose clips a background thread decodes and preprocesses
    while the engines run the one before (0: each question's clips are decoded in this thread, then encoded)."""
    if max_questions is not None and (isinstance(max_questions, bool) or max_questions < 1):
        raise ValueError(f"max_questions must be 1 or more (None: all), got {max_questions!r}")
    if isinstance(decode_ahead, bool) or not isinstance(decode_ahead, int) or decode_ahead < 0:
        raise ValueError(f"decode_ahead must be 0 or more questions, got {decode_ahead!r}")
    questions = _load_questions(questions_json, video_root)[:max_questions]
    tokens = []  # every narration tokenized (and any the text encoder refuses refused) before any video is read
    for q in questions:
        try:
            tokens.append(runtime.text_encoder.tokenize([q["text"]]))
        except QueryError as exc:
            raise DataError(questions_json, f"key {q['key']!r}", f"narration: {exc}") from exc
    runtime.load(*ROLES)  # all of them, so the summary's `backend` is the same however many questions are left
    cfg = runtime.folder.config.video
    pipe = ClipPipeline(cfg.num_frames, cfg.img_size, decode_backend)
    answered: dict[int, tuple[dict[str, torch.Tensor], float]] = {}  # question -> (scores, seconds spent on it)
    log = None
    if progress_file is not None:
        identity = run_identity(questions_json, video_root, runtime, max_questions, decode_backend, tokens)
        log = Progress(progress_file, identity)
        answered = log.open(questions)
        if log.resumed:
            print(
                f"resuming: {len(answered)} of {len(questions)} questions already answered ({log.path})",
                file=sys.stderr,
            )
    todo = [i for i in range(len(questions)) if i not in answered]
    source = _question_clips(questions_json, video_root, questions, todo, pipe, cfg.num_frames, decode_backend)
    if decode_ahead:
        source = in_background(source, decode_ahead)  # bounded: at most decode_ahead questions' clips wait
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(questions), initial=len(answered), desc="mcq", unit="question", dynamic_ncols=True)
    try:
        mark = time.perf_counter()
        for i, clips in source:
            ids, mask = tokens[i]
            scores = _scores(runtime, ids, mask, clips)
            del clips
            now = time.perf_counter()
            answered[i] = (scores, now - mark)
            if log is not None:
                log.append(i, questions[i]["key"], scores, now - mark)
            mark = now
            if bar is not None:
                bar.update()
    except BaseException:
        if log is not None:
            print(
                f"note: {log.recorded} of {len(questions)} answers are kept in {log.path}: rerun the same command to "
                "continue",
                file=sys.stderr,
            )
        raise
    finally:
        source.close()  # stops the background decoder (an error here, Ctrl-C) before this returns or raises
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    ordered = [answered[i] for i in range(len(questions))]
    results = [_result(q, scores) for q, (scores, _) in zip(questions, ordered)]
    return {
        "questions": len(results),
        "seconds": round(sum(seconds for _, seconds in ordered), 2),
        "backend": runtime.summary(),
        "accuracy": accuracy(results, [scores for scores, _ in ordered]),
        "results": results,
    }


# -- progress of a run with --out: recorded as it goes, resumed after a kill ----------------------------------------
def progress_path(out: str | Path) -> Path:
    """The progress file of `mcq --out FILE`: FILE.partial.jsonl beside it."""
    out = Path(out)
    return out.with_name(out.name + PROGRESS_SUFFIX)


# What decides the answers, as a refusal names it: a progress file is resumed only by a run that equals it in all.
IDENTITY_LABELS = {
    "questions_sha256": "questions file (sha256)",
    "max_questions": "--max-questions",
    "video_root": "--video-root",
    "engines_manifest_sha256": "engines (sha256 of manifest.json)",
    "narration_tokens": "tokenized narrations (sha256; --tokenizer)",
    "decoder": "--decoder",
    "backend": "--backend",
    "precision": "--precision",
    "device": "--device",
    "attention": "--attention",
    "compile": "--compile",
    "engines_as_run": "engines as loaded (backend, provider, precision per role)",
}


def run_identity(
    questions_json, video_root, runtime: Runtime, max_questions: int | None, decode_backend: str, tokens: list
) -> dict:
    """What the answers of a run depend on (IDENTITY_LABELS): the questions file's and the engines' manifest's
    sha256, the narrations' tokens (the tokenizer), the video folder, the decoder ('auto' as resolved here) and the
    runtime's backend, precision, device, attention and compilation."""
    from ..hashing import sha256_file

    narrations = hashlib.sha256()
    for ids, mask in tokens:
        for array in (ids, mask):
            array = np.ascontiguousarray(array, dtype=np.int64)
            narrations.update(repr(array.shape).encode() + array.tobytes())
    return {
        "questions_sha256": sha256_file(questions_json),
        "max_questions": max_questions,
        "video_root": str(Path(video_root).resolve()),
        "engines_manifest_sha256": runtime.folder.manifest_sha256,
        "narration_tokens": narrations.hexdigest(),
        "decoder": resolve_backend(decode_backend),
        "backend": runtime.backend,
        "precision": runtime.precision,
        "device": str(runtime.device),
        "attention": runtime.attention,
        "compile": bool(runtime.compile),
        "engines_as_run": runtime.summary(),  # the provider each role loaded with (CUDA can fall back to the CPU)
    }


def _header(identity: dict) -> bytes:
    return (json.dumps({"format": PROGRESS_FORMAT, "version": PROGRESS_VERSION, "run": identity}) + "\n").encode()


def _read_header(first_line: bytes) -> dict | None:
    """The header of a progress file this tool wrote, else None."""
    try:
        header = json.loads(first_line)
    except (ValueError, RecursionError):  # a file of another kind, or nested past the parser's depth
        return None
    if not isinstance(header, dict) or header.get("format") != PROGRESS_FORMAT:
        return None
    return header


class Progress:
    """The answers of one run, recorded as they are made so that a killed run resumes: a header line naming the run
    ({format, version, run: `run_identity`}), then one JSON line per answered question {i, key, seconds, scores:
    {mode: its C float32 scores, exactly}}. The header is written atomically and each answer is appended and
    flushed: a kill leaves at most a last line cut short, which `open` drops (that question is answered again)."""

    def __init__(self, path: str | Path, identity: dict) -> None:
        self.path, self.identity = Path(path), identity
        self.file = None
        self.resumed = False  # an earlier run's file was found
        self.recorded = 0  # answers in the file

    def open(self, questions: list[dict]) -> dict[int, tuple[dict[str, torch.Tensor], float]]:
        """{question: (scores, seconds)} recorded by an earlier run of this identity; starts the file when there is
        none. A file that is not a progress file, or another run's with answers in it, is refused (ValueError) and
        left as it is; one holding no answer yet (a run stopped before its first) is started again. The file is
        locked for the run: a second run with the same --out is refused while this one goes."""
        if not self.path.exists() and not self.path.is_symlink():
            _create_new(self.path, _header(self.identity))
        if not self.path.is_file() or self.path.is_symlink():
            raise ValueError(f"{self.path}: is in the way of the progress file (not a file); move it away")
        self.file = open(self.path, "r+b")
        try:
            _lock(self.file, self.path)
            data = self.file.read()
            first, _, rest = data.partition(b"\n")
            header = _read_header(first)
            if header is None:
                raise ValueError(
                    f"{self.path}: is in the way of the progress file and is not one `egovlp-deploy mcq` wrote; it "
                    "is left as it is: move it away, or write the answers elsewhere"
                )
            complete = rest.rfind(b"\n") + 1  # after the last whole line: a line cut short by a kill is left out
            if complete == 0 and header.get("run") != self.identity:  # ours, no answer in it: nothing to keep
                self.file.seek(0)
                self.file.truncate()
                self.file.write(_header(self.identity))
                self.file.flush()
                return {}
            self._check(header)
            done = {}
            for n, line in enumerate(rest[:complete].splitlines(), start=2):
                i, scores, seconds = self._parse(line, n, questions)
                done[i] = (scores, seconds)
            self.file.truncate(len(first) + 1 + complete)
            self.file.seek(0, os.SEEK_END)
        except BaseException:
            self.close()
            raise
        self.resumed, self.recorded = bool(done), len(done)
        return done

    def _check(self, header: dict) -> None:
        start_over = f"delete {self.path} to start this run over"
        if header.get("version") != PROGRESS_VERSION:
            raise ValueError(
                f"{self.path}: progress of another version of egovlp-deploy (format {header.get('version')!r}); "
                f"{start_over}"
            )
        recorded = header.get("run") if isinstance(header.get("run"), dict) else {}
        differ = []
        for name, value in self.identity.items():
            there = recorded.get(name)
            if there != value:
                label = IDENTITY_LABELS.get(name, name)
                differ.append(
                    f"another {label}"
                    if name.endswith("sha256") or name == "narration_tokens"
                    else f"{label} {there!r} there, {value!r} here"
                )
        if differ:
            raise ValueError(
                f"{self.path}: the answers of another run ({'; '.join(differ)}): rerun that run's command to finish "
                f"it, or {start_over}"
            )

    def _parse(self, line: bytes, n: int, questions: list[dict]) -> tuple[int, dict[str, torch.Tensor], float]:
        try:
            record = json.loads(line)
            i = record["i"]
            q = questions[i] if isinstance(i, int) and 0 <= i < len(questions) else None
            scores = {m: torch.tensor(record["scores"][m], dtype=torch.float32) for m in MODES}
            seconds = float(record["seconds"])
        except (ValueError, KeyError, TypeError, IndexError, RecursionError):
            q = None
        if q is None or record.get("key") != q["key"] or any(s.shape != (len(q["choices"]),) for s in scores.values()):
            raise ValueError(
                f"{self.path}: line {n} is not an answer this run records (damaged or edited); delete the file to "
                "start this run over"
            )
        return i, scores, seconds

    def append(self, i: int, key: str, scores: dict[str, torch.Tensor], seconds: float) -> None:
        """Record question i's answer; the exact float32 scores (a float's repr reads back to the same float), so a
        resumed run's accuracy and rounded scores are those of an uninterrupted one."""
        record = {"i": i, "key": key, "seconds": seconds, "scores": {m: s.tolist() for m, s in scores.items()}}
        self.file.write((json.dumps(record) + "\n").encode())
        self.file.flush()
        self.recorded += 1

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _create_new(path: Path, header: bytes) -> None:
    """Write a new progress file holding `header`, whole or not at all, and never over a file another run made in
    the meantime (a hard link of a complete temp file: it fails where the name exists)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(header)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:  # another run made it first: its header is read and checked as any other
            pass
        except OSError:  # a filesystem without hard links: created exclusively, written in place
            with contextlib.suppress(FileExistsError), open(path, "xb") as f:
                f.write(header)
    finally:
        tmp.unlink(missing_ok=True)


def _lock(file, path: Path) -> None:
    """An exclusive lock on the open progress file for the run (released when it is closed, or the process ends);
    ValueError where another run holds it. A filesystem that cannot lock is used unlocked."""
    from ..folder_lock import try_exclusive_lock

    if not try_exclusive_lock(file.fileno()):
        raise ValueError(
            f"{path}: another `egovlp-deploy mcq` run with this --out is answering now; wait for it to finish, "
            "or write the answers elsewhere"
        )


def remove_progress(path: str | Path) -> None:
    """Delete a run's progress file once its answers are written; a file there that this tool did not write (no
    progress header) is left."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            first = f.readline()
    except (FileNotFoundError, IsADirectoryError):
        return
    if _read_header(first.rstrip(b"\n")) is not None:
        path.unlink(missing_ok=True)


def accuracy(results: list[dict], scores: list[dict[str, torch.Tensor]]) -> dict:
    """{mode: {'all': %, 'Inter-video': %, 'Intra-video': %}} over the questions that have an answer; `scores`
    holds each question's unrounded (C,) scores per mode."""
    answered = [i for i, r in enumerate(results) if r["answer"] is not None]
    if not answered:
        return {m: {} for m in MODES}
    answers = torch.tensor([results[i]["answer"] for i in answered])
    types = torch.tensor([results[i]["type"] for i in answered])
    out = {}
    for m in MODES:
        percent = egomcq_accuracy(torch.stack([scores[i][m] for i in answered]), answers, types, include_all=True)
        out[m] = {k: round(v, 1) for k, v in percent.items()}
    return out
