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
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..data.errors import DataError
from ..decoding import VideoReadError, read_egoclip_clip
from ..evaluation import MODES, choice_scores
from ..metrics import egomcq_accuracy
from .clip_pipeline import ClipPipeline
from .engines import QueryError, Runtime

NUM_CHOICES = 5  # EgoMCQ's, as `egovlp-deploy eval` requires


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


def answer_mcq(
    questions_json: str | Path,
    video_root: str | Path,
    runtime: Runtime,
    max_questions: int | None = None,
    progress: bool = True,
    decode_backend: str = "auto",
) -> dict:
    if max_questions is not None and (isinstance(max_questions, bool) or max_questions < 1):
        raise ValueError(f"max_questions must be 1 or more (None: all), got {max_questions!r}")
    questions = _load_questions(questions_json, video_root)[:max_questions]
    tokens = []  # every narration tokenized (and any the text encoder refuses refused) before any video is read
    for q in questions:
        try:
            tokens.append(runtime.text_encoder.tokenize([q["text"]]))
        except QueryError as exc:
            raise DataError(questions_json, f"key {q['key']!r}", f"narration: {exc}") from exc
    cfg = runtime.folder.config.video
    pipe = ClipPipeline(cfg.num_frames, cfg.img_size, decode_backend)
    it = questions
    if progress:
        from tqdm import tqdm

        it = tqdm(questions, desc="mcq", unit="question", dynamic_ncols=True)
    results, all_scores, t0 = [], [], time.perf_counter()
    for q, (ids, mask) in zip(it, tokens):
        # each choice is preprocessed as soon as it is decoded: choices come from videos of any size, and only one
        # choice's full-size frames are held at a time
        decoding, clips = 0.0, []
        for i in range(len(q["choices"])):
            t = time.perf_counter()
            frames = _read_choice(questions_json, video_root, q, i, cfg.num_frames, decode_backend)
            decoding += time.perf_counter() - t
            clips.append(pipe.preprocess(torch.from_numpy(frames[None]))[0])
            del frames
        pipe.times.add("decode", decoding, len(clips))
        clips = np.stack(clips)
        text = runtime.text_encoder.encode_tokens(ids, mask)
        video = runtime.video_encoder.encode(clips)
        match = runtime.fusion.score_prefixes(
            runtime.video_encoder.fusion_prefix(clips), text.prefix[:1], text.mask[:1]
        )
        scores = choice_scores(_float32(text.embedding[:1]), _float32(video)[None], _float32(match)[None])
        scores = {m: s[0] for m, s in scores.items()}
        results.append(
            {
                "key": q["key"],
                "text": q["text"],
                "answer": q["answer"],
                "type": q["type"],
                "predicted": {m: int(torch.argmax(s)) for m, s in scores.items()},
                "scores": {m: [round(float(x), 5) for x in s] for m, s in scores.items()},
            }
        )
        all_scores.append(scores)
    return {
        "questions": len(results),
        "seconds": round(time.perf_counter() - t0, 2),
        "backend": runtime.summary(),
        "accuracy": accuracy(results, all_scores),
        "results": results,
    }


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
