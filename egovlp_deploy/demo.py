"""`egovlp-deploy demo`: the whole path in one command, on a CPU, in a few minutes, everything under one folder.

    OUT/data/      synthetic egocentric dataset (egovlp-deploy synth, fewer videos than the default)
    OUT/run/       a short training run of the tiny model (trainer API, checkpoint + tokenizer)
    OUT/engines/   ONNX engines of the four runtime roles + manifest.json (export API, validated against PyTorch)
    OUT/index/     the held-out videos' annotated clips, indexed with fusion prefixes
    OUT/report.json, OUT/report.md   what is printed at the end
    OUT/demo.json  written first: marks the folder as the demo's, which --force may replace (and no other folder)

Then: sample searches (top hits with timestamps; a hit is correct when its clip's narration is the query),
text->clip R@1 over every held-out clip (a query's correct clips are those with its exact narration; chance is
printed beside it), EgoMCQ on the held-out questions (chance 20%), and a latency table per stage.
The training is bounded by steps and by minutes (whichever comes first), so a slow machine gets a weaker model in
the same time, not a longer demo; the printed step count says which.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from egovlp_deploy.jsonfile import read_json
from egovlp_deploy.path_text import some_names
from egovlp_deploy.tokenizer import check_savable_path

DESCRIPTION = __doc__
SAMPLE_QUERIES = 4


def add_arguments(p) -> None:
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output folder (default: demo_out)")
    p.add_argument("--force", action="store_true", help="replace the OUT of an earlier demo (no other folder)")
    # The defaults trade the demo's length against the trained model's accuracy: fewer videos and steps give a much
    # weaker model. With them the demo takes about 4 minutes on a quiet 2-core CPU (more with a fresh clone's
    # setup), the training stopped by its 2.2-minute budget (BENCHMARKS.md, "The demo").
    g = p.add_argument_group("sizes (defaults: about 4 minutes on a quiet 2-core CPU)")
    g.add_argument(
        "--train-videos", type=int, default=200, metavar="N", help="synthetic training videos (default: 200)"
    )
    g.add_argument("--eval-videos", type=int, default=6, metavar="N", help="held-out videos (default: 6)")
    g.add_argument("--steps", type=int, default=400, metavar="N", help="training steps at most (default: 400)")
    g.add_argument(
        "--train-minutes", type=float, default=2.2, metavar="M", help="training wall-clock budget (default: 2.2)"
    )
    g.add_argument(
        "--quick",
        action="store_true",
        help="a plumbing check in about a minute: tiny data, a few steps (accuracy meaningless)",
    )


# The demo's folder: a marker written first, then these entries (and the hidden temp names of their atomic writes).
MARKER, MARKER_FORMAT = "demo.json", "egovlp-deploy demo"
WRITTEN = frozenset({MARKER, "data", "run", "engines", "index", "report.json", "report.md"})
_TEMP = re.compile(r"\.(" + "|".join(re.escape(n) for n in sorted(WRITTEN)) + r")[.-].+")


def check_replaceable(out: Path) -> None:
    """Raise unless `out` is a demo folder (its marker) holding only what the demo writes (what --force may
    delete)."""
    marker = out / MARKER
    try:
        ours = read_json(marker, expect=dict).get("format") == MARKER_FORMAT  # a FIFO or huge file is refused unread
    except ValueError:
        ours = False
    if not ours:
        raise ValueError(
            f"{out}: not a folder written by egovlp-deploy demo (no {MARKER}); --force replaces only such a folder, "
            "and nothing was deleted. Give a new or empty folder (or delete an older demo's folder yourself)"
        )
    others = sorted(p.name for p in out.iterdir() if p.name not in WRITTEN and not _TEMP.fullmatch(p.name))
    if others:
        raise ValueError(
            f"{out}: holds files the demo did not write ({some_names(others)}); --force would delete them, so "
            "nothing was deleted. Move them out or give another folder"
        )


class _Clock:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.parts: dict[str, float] = {}

    def stage(self, name: str, seconds: float) -> None:
        self.parts[name] = round(seconds, 1)
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {name} done in {seconds:.1f} s", flush=True)


def run(args) -> int:
    report = run_demo(
        Path(args.out),
        force=args.force,
        train_videos=args.train_videos,
        eval_videos=args.eval_videos,
        steps=args.steps,
        train_minutes=args.train_minutes,
        quick=args.quick,
    )
    print(report["text"])
    return 0


def run_demo(
    out: Path,
    force: bool = False,
    train_videos: int = 200,
    eval_videos: int = 6,
    steps: int = 400,
    train_minutes: float = 2.2,
    quick: bool = False,
) -> dict:
    if quick:
        train_videos, eval_videos, steps, train_minutes = 4, 2, 3, 0.5
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:  # stages 3-6 need it: say so before minutes of training
        raise ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")
    check_savable_path(out, "the demo's tokenizer")  # before minutes of work
    if out.is_symlink() and not out.exists():
        raise ValueError(f"{out}: a symlink to {os.readlink(out)}, which does not exist (or is a symlink loop)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    from .folder_lock import exclusive_writer

    # One demo per folder: a second one (with --force too) must not delete the files of a demo still running.
    with exclusive_writer(out, "demo folder", ValueError, then="rerun it with --force to start again"):
        _start(out, force)
        return _stages(out, train_videos, eval_videos, steps, train_minutes, quick)


def _start(out: Path, force: bool) -> None:
    """Empty `out` (only a demo folder, and only with `force`), then write its marker."""
    if any(out.iterdir()):
        if not force:
            raise ValueError(f"{out}: not empty (pass --force to replace it)")
        check_replaceable(out)
        _clear(out)
    from egovlp_deploy.checkpoint import atomic_write_bytes

    atomic_write_bytes(out / MARKER, json.dumps({"format": MARKER_FORMAT}).encode())  # --force may replace it later


def _clear(out: Path) -> None:
    """Delete what an earlier demo wrote in `out`, the marker last: a deletion that stops half way leaves a folder
    that --force still recognises as the demo's. `out` itself stays (it holds the writer lock, and may be a symlink
    the user made); a symlink among the entries is removed, never followed."""
    for entry in sorted(out.iterdir(), key=lambda p: p.name == MARKER):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _stages(out: Path, train_videos: int, eval_videos: int, steps: int, train_minutes: float, quick: bool) -> dict:
    from egovlp_deploy.data import synth

    clock = _Clock()

    # 1. data
    t = time.perf_counter()
    print(f"1/6 synthetic dataset: {train_videos} training + {eval_videos} held-out videos", flush=True)
    clips_per_video = 6 if quick else 10
    synth.generate(
        out / "data",
        seed=0,
        workers=synth.DEFAULT_WORKERS,
        train_videos=train_videos,
        eval_videos=eval_videos,
        clips_per_video=clips_per_video,
    )
    clock.stage("synthetic data", time.perf_counter() - t)

    # 2. training
    t = time.perf_counter()
    print(f"2/6 training the tiny model (at most {steps} steps or {train_minutes} min)", flush=True)
    summary = _train(out, steps, train_minutes, quick)
    clock.stage("training", time.perf_counter() - t)

    # 3. export
    t = time.perf_counter()
    print("3/6 exporting ONNX engines (validated against PyTorch)", flush=True)
    export = _export(out)
    clock.stage("export", time.perf_counter() - t)

    # 4. index
    from .runtime.commands import read_segments
    from .runtime.engines import Runtime
    from .runtime.index import IndexSettings, MomentIndex, build_index

    t = time.perf_counter()
    print("4/6 indexing the held-out clips", flush=True)
    from . import preprocess

    if not preprocess.available():  # the same numbers either way; only the preprocess latency differs
        print(
            "note: the C++ extension egovlp_deploy._C cannot be imported "
            f"({preprocess.unavailable_reason()}); clips are preprocessed by the torch reference",
            flush=True,
        )
    rt = Runtime(out / "engines", backend="onnxruntime", device="cpu")
    meta = read_json(out / "data" / "meta.json", expect=dict)
    videos = [str(out / "data" / "videos" / uid / "0.mp4") for uid in meta["splits"]["eval"]]
    segments = read_segments(out / "data" / "egoclip_eval.csv", videos)
    settings = IndexSettings(
        frames=rt.folder.config.video.num_frames, window_sec=0.0, stride_sec=0.0, prefixes=True, mode="segments"
    )
    index_summary = build_index(out / "index", videos, rt, settings, segments=segments)
    clock.stage("indexing", time.perf_counter() - t)

    # 5. search + R@1
    t = time.perf_counter()
    print("5/6 searching", flush=True)
    index = MomentIndex(out / "index")
    retrieval = _retrieval(index, rt)
    clock.stage("search", time.perf_counter() - t)

    # 6. EgoMCQ
    from .runtime.mcq import answer_mcq

    t = time.perf_counter()
    print("6/6 EgoMCQ on the held-out questions", flush=True)
    mcq = answer_mcq(
        out / "data" / "egomcq.json", out / "data" / "videos", rt, max_questions=10 if quick else None, progress=True
    )
    clock.stage("EgoMCQ", time.perf_counter() - t)

    latency = _latency(rt, index, index_summary)
    total = time.perf_counter() - clock.t0
    report = {
        "out": str(out),
        "train": summary,
        "export_passed": export,
        "index": index_summary,
        "retrieval": {k: v for k, v in retrieval.items() if k != "samples_text"},
        "mcq": {k: v for k, v in mcq.items() if k != "results"},
        "latency_ms": latency,
        "stages_s": clock.parts,
        "total_s": round(total, 1),
        "backend": rt.describe(),
    }
    report["text"] = _format(report, retrieval["samples_text"])
    from egovlp_deploy.checkpoint import atomic_write_bytes

    atomic_write_bytes(
        out / "report.json", json.dumps({k: v for k, v in report.items() if k != "text"}, indent=1).encode()
    )
    atomic_write_bytes(out / "report.md", report["text"].encode())
    return report


def _train(out: Path, steps: int, minutes: float, quick: bool) -> dict:
    from egovlp_deploy.trainer.config import TrainConfig
    from egovlp_deploy.trainer.train import apply_overrides, train

    data = TrainConfig.load("tiny_synthetic.json").to_dict()
    data["data"]["root"] = str(out / "data")
    apply_overrides(
        data,
        [
            f"schedule.max_steps={steps}",
            f"schedule.max_minutes={minutes}",
            "data.egomcq_json=null",  # the demo answers EgoMCQ with the exported engines instead
            "checkpoint.every_steps=100000",
            "data.num_workers=0" if quick else "data.num_workers=1",
            # the recipe's 32 clips per step would fit ~260 steps into the demo's 2.2 minutes: half
            # the batch (at the learning rate tuned for it) gives the whole 400-step schedule
            f"schedule.batch_size={4 if quick else 16}",
            "optim.lr=0.001",
        ]
        + (["model.text_warmup_steps=10"] if quick else []),
    )
    result = train(TrainConfig.from_dict(data), out / "run", progress=True)
    return {"steps": result["steps"], "minutes": round(result["minutes"], 2)}


def _export(out: Path) -> bool:
    from egovlp_deploy.export.runner import ExportOptions, run_export

    # The four roles the runtime uses; the one-graph `fusion` is the re-ranker's reference (bench, tests), not
    # needed here. Task checks and the ORT-optimized copies are skipped to keep the demo short: every artifact is
    # still validated against PyTorch.
    opts = ExportOptions(
        roles=("video_encoder", "text_encoder", "video_fusion_prefix", "fusion_head"),
        task_checks=False,
        ort_optimize="never",
    )
    result = run_export(str(out / "run"), out / "engines", opts)
    if not result.passed:
        raise ValueError(f"export validation failed: {result.errors or [c.failures for c in result.checks]}")
    return result.passed


def _retrieval(index, rt) -> dict:
    """Text->clip R@1 / R@5 over every held-out clip as a query (dual, and fusion re-ranked top 10)."""
    from .runtime.commands import format_hits

    labels = [index.label(r) for r in range(len(index))]
    texts = sorted(set(labels))
    enc = rt.text_encoder.encode(texts)
    q = enc.embedding / np.linalg.norm(enc.embedding, axis=1, keepdims=True)
    sims = q @ index.embeddings.T  # (Q, N)
    lab = np.array(labels)
    r1 = r5 = r1_rr = chance = 0.0
    rerank_k = min(10, len(index))
    for i, text in enumerate(texts):
        order = np.argsort(-sims[i], kind="stable")
        right = lab == text
        weight = right.sum()  # every clip is a query: weight each distinct narration by its clip count
        r1 += weight * right[order[0]]
        r5 += weight * right[order[:5]].any()
        chance += weight * right.mean()
        from .runtime.engines import TextOutput

        one = TextOutput(enc.embedding[i : i + 1], enc.prefix[i : i + 1], enc.mask[i : i + 1], enc.input_ids[i : i + 1])
        hits = index.search(rt, text, top=1, rerank=rerank_k, text=one)
        r1_rr += weight * (hits[0].label == text)
    n = len(labels)
    rng = np.random.default_rng(0)
    samples = [texts[int(j)] for j in rng.choice(len(texts), size=min(SAMPLE_QUERIES, len(texts)), replace=False)]
    lines = []
    for s in samples:
        hits = index.search(rt, s, top=3, rerank=rerank_k)
        lines.append(format_hits(s, hits, show_label=False))
        lines += [f"      {'correct' if h.label == s else 'wrong: ' + str(h.label)}" for h in hits[:1]]
    return {
        "queries": n,
        "distinct_narrations": len(texts),
        "R@1": round(100 * r1 / n, 1),
        "R@5": round(100 * r5 / n, 1),
        "R@1 reranked top10": round(100 * r1_rr / n, 1),
        "chance R@1": round(100 * chance / n, 1),
        "samples_text": "\n".join(lines),
    }


def _latency(rt, index, index_summary) -> dict:
    """Batch-1 medians of the runtime stages (the index run gives decode and preprocess per clip)."""
    from .benchmarking import median_ms

    video = rt.example("video_encoder")
    ms = dict(index_summary["ms_per_clip"])
    ms["video encode (B=1)"] = median_ms(lambda: rt.runner("video_encoder")(**video))
    ms["text encode (B=1)"] = median_ms(lambda: rt.text_encoder.encode(["#C C picks up the red cup"]))
    text = rt.text_encoder.encode(["#C C picks up the red cup"])
    pre = index.prefixes(list(range(min(5, len(index)))))
    ms["re-rank 5 clips (cached prefixes)"] = median_ms(lambda: rt.fusion.score_prefixes(pre, text.prefix, text.mask))
    return {k: round(v, 2) for k, v in ms.items()}


def _format(r: dict, samples: str) -> str:
    ret, mcq = r["retrieval"], r["mcq"]["accuracy"]
    lines = [
        "",
        "=" * 78,
        f"egovlp-deploy demo: {r['total_s']:.0f} s in all, everything under {r['out']}",
        "=" * 78,
        f"trained {r['train']['steps']} steps in {r['train']['minutes']:.1f} min; engines: ONNX Runtime "
        f"({', '.join(sorted({b['provider'] for b in r['backend']}))}), fp32, validated against PyTorch",
        "",
        "Sample searches (top 3; score = cosine + VTM probability after fusion re-ranking of the top 10):",
        samples,
        "",
        f"Text -> clip retrieval on {ret['queries']} held-out clips ({ret['distinct_narrations']} distinct "
        f"narrations): R@1 {ret['R@1']:.1f}%  R@5 {ret['R@5']:.1f}%  R@1 after re-ranking "
        f"{ret['R@1 reranked top10']:.1f}%  (chance R@1 {ret['chance R@1']:.1f}%)",
        f"EgoMCQ on {r['mcq']['questions']} held-out questions (chance 20%):",
    ]
    for mode, acc in mcq.items():
        lines.append(
            f"  {mode:<9} all {acc.get('all', float('nan')):5.1f}%   inter {acc.get('Inter-video', float('nan')):5.1f}%"
            f"   intra {acc.get('Intra-video', float('nan')):5.1f}%"
        )
    preprocessing = r["index"].get("preprocessing")
    lines += [
        "",
        "Latency per clip / query (ms, this machine"
        + (f"; preprocessing: {preprocessing}):" if preprocessing else "):"),
    ]
    for k, v in r["latency_ms"].items():
        lines.append(f"  {k:<36} {v:8.2f}")
    lines += ["", "Stages (s): " + ", ".join(f"{k} {v}" for k, v in r["stages_s"].items())]
    return "\n".join(lines) + "\n"
