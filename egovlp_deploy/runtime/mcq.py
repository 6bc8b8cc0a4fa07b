"""EgoMCQ-style answering on the runtime: a narration and C candidate clips, pick the clip that shows it.

Input: the official EgoMCQ JSON (`{"0": {"types", "query": {clip_text...}, "choices": {"0": {video_uid,
clip_start, clip_end...}, ...}, "answer"}}`, `answer` optional here) with videos in the EgoClip chunked layout
(ROOT/<video_uid>/<chunk>.mp4). Each choice is read as the official evaluation reads it ('uniform' sampling of the
engine's F frames, eval transform), so the scores equal `egovlp-deploy eval` on the same checkpoint.

The file is read and checked by the EgoMCQ reader `egovlp-deploy eval` uses (data/egomcq.py), before any video is
read: a file one of them rejects, the other rejects with the same DataError naming the question's key. The one
difference: a question may leave out `answer` here (it is answered, not scored).

Scores per choice, as the official validation: dual (cosine of the projected embeddings), fusion (VTM match
probability over the clip's and the narration's prefixes) and ensemble (their sum).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .engines import Runtime
from .pipeline import ClipPipeline

MODES = ("dual", "fusion", "ensemble")
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
    return [{"key": e.key, "text": e.text, "choices": [(c.video_uid, c.start_sec, c.end_sec) for c in e.choices],
             "answer": e.answer, "type": e.type} for e in entries]


def answer_mcq(questions_json: str | Path, video_root: str | Path, runtime: Runtime, max_questions: int | None = None,
               progress: bool = True, decode_backend: str = "auto") -> dict:
    from egovlp_deploy.video import read_egoclip_clip

    questions = _load_questions(questions_json, video_root)[:max_questions]
    cfg = runtime.folder.config.video
    pipe = ClipPipeline(cfg.num_frames, cfg.img_size, decode_backend)
    it = questions
    if progress:
        from tqdm import tqdm

        it = tqdm(questions, desc="mcq", unit="question", dynamic_ncols=True)
    results, t0 = [], time.perf_counter()
    for q in it:
        t = time.perf_counter()
        frames = np.stack([read_egoclip_clip(video_root, uid, s, e, cfg.num_frames, "uniform",
                                             backend=decode_backend).numpy() for uid, s, e in q["choices"]])
        pipe.times.add("decode", time.perf_counter() - t, len(frames))
        import torch

        clips = pipe.preprocess(torch.from_numpy(frames))
        text = runtime.text_encoder.encode([q["text"]])
        v = runtime.video_encoder.encode(clips)
        tv = text.embedding[0] / max(np.linalg.norm(text.embedding[0]), 1e-12)
        dual = (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)) @ tv
        fusion = runtime.fusion.score_prefixes(runtime.video_encoder.fusion_prefix(clips), text.prefix[:1],
                                               text.mask[:1])
        scores = {"dual": dual, "fusion": fusion, "ensemble": dual + fusion}
        results.append({"key": q["key"], "text": q["text"], "answer": q["answer"], "type": q["type"],
                        "predicted": {m: int(np.argmax(s)) for m, s in scores.items()},
                        "scores": {m: [round(float(x), 5) for x in s] for m, s in scores.items()}})
    summary = {"questions": len(results), "seconds": round(time.perf_counter() - t0, 2),
               "backend": runtime.summary(), "accuracy": accuracy(results), "results": results}
    return summary


def accuracy(results: list[dict]) -> dict:
    """{mode: {'all': %, 'Inter-video': %, 'Intra-video': %}} over the questions that have an answer."""
    out = {}
    for m in MODES:
        groups: dict[str, list[bool]] = {}
        for r in results:
            if r["answer"] is None:
                continue
            ok = r["predicted"][m] == r["answer"]
            groups.setdefault("all", []).append(ok)
            name = {1: "Inter-video", 2: "Intra-video"}.get(r["type"])
            if name:
                groups.setdefault(name, []).append(ok)
        out[m] = {k: round(100.0 * sum(v) / len(v), 1) for k, v in groups.items()}
    return out
