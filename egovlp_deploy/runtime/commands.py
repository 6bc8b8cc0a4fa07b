"""`egovlp-deploy index | search | mcq | features | demo`: argument definitions and runners (registered in
egovlp_deploy/cli.py). Each `run_*(args)` returns an exit code; errors are ValueErrors that name the problem."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import functools
import json
import sys
import warnings
from pathlib import Path

from ..arg_types import non_negative_int, positive_int
from ..path_text import printable

INDEX_DESCRIPTION = """Index videos for text search: sliding clip windows (or annotated segments) -> dual embeddings
with timestamps (+ fusion prefixes for re-ranking), in INDEX/ as safetensors shards + index.json.

Incremental: run it again with more videos to extend the index; videos already indexed are skipped, changed files
re-indexed. A killed run resumes where it stopped (fewer than twice --commit-every windows are recomputed) and never
leaves a corrupt index; a shard deleted or damaged since is encoded again by the same command. The index records
the model it was built with and refuses another model's engines. --out is a new or empty folder, or an existing
index: a folder holding anything else is refused, and nothing `index` did not write is ever deleted."""

SEARCH_DESCRIPTION = """Search an index in words: the top moments (video, start-end seconds) by dual cosine
similarity; --rerank K re-scores the top K with the fusion encoder over the cached prefixes (index built with
--prefixes), by the VTM match probability or the official ensemble (cosine + probability)."""

MCQ_DESCRIPTION = """Answer EgoMCQ-style questions (official egomcq.json format: a narration and 5 candidate clips)
with the exported engines, in dual, fusion and ensemble mode; prints accuracy when answers are given. The next
questions' clips are decoded in a background thread while the engines answer the current one.

With --out FILE, each answer is recorded as it is made in FILE.partial.jsonl: a killed or failed run resumes when
the same command is run again (only the questions not yet answered are answered), and FILE, written at the end, is
the one an uninterrupted run writes. A progress file of another run (other questions, engines or options) is
refused: delete it to start over."""

FEATURES_DESCRIPTION = """Extract per-window features of your own videos for downstream heads: --mode dual gives
projected dual video embeddings per window (EgoMQ / VSGN layout: features (T, P) + timestamps (T, 2)); --mode
fusion gives the fused video CLS and fused text tokens per window and query (EgoNLQ / VSLNet, the EgoVLPv2 recipe:
video_cls (Q, T, Dv), text_tokens (Q, T, L, Dt), text_mask (Q, L), timestamps). Windows of --frames source frames
every --stride frames; one output per video, written atomically; finished videos are skipped on a rerun, and a
killed run resumes inside the video it was on (at most --commit-every windows are recomputed)."""


# -- shared options ---------------------------------------------------------------------------------------------
def seconds(text: str) -> float:
    """argparse type: a window length or stride in seconds (finite, at least 1 ms)."""
    from .clip_pipeline import check_seconds

    try:
        return check_seconds(float(text), "the value")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("the value ", "")) from None


def _engine_options(parser, required: bool = True) -> None:
    g = parser.add_argument_group("engines")
    g.add_argument(
        "--engines",
        required=required,
        metavar="DIR",
        help="an export folder (manifest.json + artifacts from `egovlp-deploy export`)"
        + ("" if required else "; default: the one the index was built with"),
    )
    g.add_argument(
        "--backend",
        default="onnxruntime",
        choices=("onnxruntime", "torch", "program", "aoti", "tensorrt"),
        help="onnxruntime (default), torch (eager; weights from the checkpoint the manifest names), "
        "program (torch.export programs), aoti (AOTInductor packages: native code that loading runs, so use only "
        "engines folders you trust; a package runs only if its sha256 is the manifest's), tensorrt (engines; needs "
        "TensorRT and a GPU)",
    )
    g.add_argument(
        "--device", default="cpu", help="cpu (default), cuda, or tensorrt (onnxruntime's TensorRT execution provider)"
    )
    g.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "fp16", "int8"),
        help="which exported precision to run (default: fp32)",
    )
    g.add_argument("--threads", type=positive_int, metavar="N", help="intra-op threads (default: the runtime's choice)")
    g.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="tokenizer directory (default: ENGINES/tokenizer, else the training run's RUN/tokenizer)",
    )
    g.add_argument(
        "--checkpoint",
        metavar="CKPT",
        help="torch backend only: the checkpoint (default: the one the manifest names; its sha256 must match)",
    )
    g.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="torch, program and aoti backends: capture each call once per input shape into a CUDA graph and "
        "replay it (on a CPU device it runs eagerly and says so)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch and program backends: compile each role with Inductor on this device at load (its on-disk "
        "cache makes the next run's compile short)",
    )
    g.add_argument(
        "--attention",
        default="auto",
        help="torch backend only: the attention implementation: auto (Triton kernels on CUDA, plain torch on a "
        "CPU), reference, sdpa, triton, or tuned (per shape the fastest measured on this device; default: auto)",
    )
    g.add_argument(
        "--attention-plan",
        metavar="FILE",
        help="with --attention tuned: a JSON file keeping the measured picks across runs (created if missing; "
        "entries measured on another device or torch/Triton version are kept but not used)",
    )


def _runtime(args, engines: str | None = None):
    """The Runtime of a one-shot command, without the warm-up pass at each role's load: the command's first call
    pays the same lazy allocation (a paper-size role's warm-up pass is 7-14 s on a small CPU); `index` leaves its
    first batch out of its timings."""
    from .engines import ProviderFallbackWarning, Runtime

    warnings.simplefilter("always", ProviderFallbackWarning)
    return Runtime(
        engines or args.engines,
        warmup=False,
        backend=args.backend,
        precision=args.precision,
        device=args.device,
        threads=args.threads,
        tokenizer=args.tokenizer,
        checkpoint=getattr(args, "checkpoint", None),
        graphs=getattr(args, "cuda_graphs", False),
        compile=getattr(args, "compile", False),
        attention=getattr(args, "attention", "auto"),
        attention_plan=getattr(args, "attention_plan", None),
    )


@contextlib.contextmanager
def runtime_warnings():
    """Show each QueryTruncatedWarning as one line on stderr, `warning: query truncated to N tokens: ...` (the text
    encoder reports a query once), and so each FailedValidationWarning (once per artifact); other warnings are shown
    as before."""
    from .engines import FailedValidationWarning, QueryTruncatedWarning

    with warnings.catch_warnings():
        show_other = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, (QueryTruncatedWarning, FailedValidationWarning)):
                print(f"warning: {message}", file=sys.stderr)
            else:
                show_other(message, category, filename, lineno, file, line)

        warnings.simplefilter("always", QueryTruncatedWarning)
        warnings.showwarning = show
        yield


def reports_runtime_warnings(run):
    """A runner whose truncated queries and failed-validation artifacts are reported by `runtime_warnings`."""

    @functools.wraps(run)
    def wrapped(args) -> int:
        with runtime_warnings():
            return run(args)

    return wrapped


def _failure_options(parser) -> None:
    parser.add_argument(
        "--allow-failures",
        action="store_true",
        help="exit 0 even when some inputs could not be read (they are still reported)",
    )
    parser.add_argument("--verbose", action="store_true", help="with each unreadable input, the decoder's message")


def _report_notes(summary: dict) -> None:
    """Inputs used only in part (a truncated file, indexed as far as it decodes), one line each on stderr."""
    for n in summary.get("notes", []):
        print(f"note: {printable(n['path'])}: {n['note']}", file=sys.stderr)


def _report_failures(summary: dict, args) -> int:
    """Unreadable inputs, one line each on stderr; the exit status: 1 when any failed, unless --allow-failures and
    at least one input was processed (or already done)."""
    failed = summary.get("failed", [])
    if not failed:
        return 0
    print(
        f"{len(failed)} input(s) could not be read ({summary.get('succeeded', 0)} processed or already done):",
        file=sys.stderr,
    )
    for f in failed:
        detail = f" ({f['detail']})" if args.verbose and f.get("detail") else ""
        print(f"  {printable(f['path'])}: {f['reason']}{detail}", file=sys.stderr)
    return 0 if args.allow_failures and summary.get("succeeded", 0) else 1


def _print_backend(rt, stream=None) -> None:
    stream = stream or sys.stderr  # looked up per call: sys.stderr may be replaced after import
    for r in rt.describe():
        graphs = f" / {r['graphs']}" if "graphs" in r else ""
        print(f"  {r['role']:<20} {r['backend']} / {r['provider']} / {r['precision']}{graphs}", file=stream)
    plan = getattr(rt, "attention_plan", None)
    if plan is not None:  # which implementation each attention shape ran, and the times it was picked by
        print(f"  {plan.summary()}", file=stream)
        for line in plan.report():
            print(f"    {line}", file=stream)


# -- index ------------------------------------------------------------------------------------------------------
def add_index_arguments(p) -> None:
    p.add_argument(
        "videos",
        nargs="+",
        metavar="VIDEO",
        help="video files, folders (searched recursively for video files) or glob patterns",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="INDEX",
        help="index directory: new or empty (created), or an existing index (extended)",
    )
    _failure_options(p)
    _engine_options(p)
    w = p.add_argument_group("windows")
    w.add_argument("--window", type=seconds, default=2.0, metavar="SEC", help="clip window length (default: 2.0 s)")
    w.add_argument("--stride", type=seconds, default=1.0, metavar="SEC", help="window start step (default: 1.0 s)")
    w.add_argument(
        "--segments",
        metavar="CSV",
        help="index annotated segments instead of sliding windows: an EgoClip-format TAB file "
        "(video_uid, clip_start, clip_end, clip_text); a video matches a row by its file stem or, "
        "for ROOT/<uid>/0.mp4, its folder name",
    )
    w.add_argument(
        "--prefixes",
        action="store_true",
        help="also store each clip's fusion prefix (enables search --rerank; larger index)",
    )
    w.add_argument(
        "--prefix-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="storage of the prefixes (float16 halves the size; default: float32)",
    )
    w.add_argument("--batch", type=positive_int, default=8, metavar="B", help="windows per encoder call (default: 8)")
    w.add_argument(
        "--commit-every",
        type=positive_int,
        default=32,
        metavar="N",
        help="windows per shard and between commits: fewer than 2N are recomputed after a kill (default: 32)",
    )
    w.add_argument(
        "--decoder",
        choices=("auto", "decord", "pyav"),
        default="auto",
        help="video decoder (default: auto = PyAV, which streams whole videos fastest and reads "
        "files decord refuses; decord numbers and decodes frames identically)",
    )
    p.add_argument(
        "--prune",
        action="store_true",
        help="drop indexed videos whose file is gone (moved, renamed or deleted), with their shards; without "
        "it they stay searchable and the run notes them",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def read_segments(csv_path: str | Path, videos: list[str]) -> dict[str, list]:
    """{video path: [(start, end, text)]} from an EgoClip TAB file (data/egoclip.py reads it), matching rows to the
    given files by uid."""
    from ..data.egoclip import read_segments_by_uid
    from .clip_pipeline import video_uid

    if not Path(csv_path).is_file():
        raise ValueError(f"{csv_path}: no such segments file")
    by_uid = read_segments_by_uid(csv_path)
    out = {}
    for v in videos:  # a video with no rows is left out: the index reports it as a failed input
        p = Path(v)
        uid = video_uid(p)
        if uid in by_uid:
            out[str(p)] = by_uid[uid]
    return out


@reports_runtime_warnings
def run_index(args) -> int:
    from .index import IndexSettings, build_index

    rt = _runtime(args)
    settings = IndexSettings(
        frames=rt.folder.config.video.num_frames,
        window_sec=args.window,
        stride_sec=args.stride,
        prefixes=args.prefixes,
        prefix_dtype=args.prefix_dtype,
        mode="segments" if args.segments else "windows",
        batch=args.batch,
        commit_every=args.commit_every,
    )
    if args.segments:
        settings.window_sec = settings.stride_sec = 0.0  # not used: the segments give the windows
    segments = None
    if args.segments:
        from .clip_pipeline import expand_inputs

        segments = read_segments(args.segments, [str(p) for p in expand_inputs(args.videos)[0]])
    summary = build_index(
        args.out,
        args.videos,
        rt,
        settings,
        segments=segments,
        progress=not (args.quiet or args.json),
        decode_backend=args.decoder,
        prune=args.prune,
    )
    if args.json:
        print(json.dumps(summary, indent=2))
        _report_notes(summary)
        return _report_failures(summary, args)
    print(
        f"index {summary['index']}: {summary['videos']} videos, {summary['windows']} clips "
        f"({summary['new_windows']} new) in {summary['seconds']:.1f} s"
    )
    print(f"  preprocessing: {summary['preprocessing']}")
    print(
        "  ms per clip (steady state, each encoder's first batch left out as warm-up): "
        + ", ".join(f"{k} {v:.2f}" for k, v in summary["ms_per_clip"].items())
    )
    _print_backend(rt, sys.stdout)
    _report_notes(summary)
    return _report_failures(summary, args)


# -- search -----------------------------------------------------------------------------------------------------
def add_search_arguments(p) -> None:
    p.add_argument("index", metavar="INDEX", help="an index directory from `egovlp-deploy index`")
    p.add_argument("query", nargs="+", metavar="QUERY", help="what to look for, in words (several: one search each)")
    p.add_argument("--top", type=positive_int, default=5, metavar="N", help="moments to show (default: 5)")
    p.add_argument(
        "--rerank",
        type=non_negative_int,
        default=0,
        metavar="K",
        help="re-score the dual top K with the fusion encoder over cached prefixes (index built with "
        "--prefixes); 0 turns re-ranking off (default: 0)",
    )
    p.add_argument(
        "--rerank-score",
        choices=("ensemble", "vtm"),
        default="ensemble",
        help="ensemble: cosine + VTM probability (official EgoMCQ ensemble, default); vtm: probability",
    )
    _engine_options(p, required=False)
    p.add_argument("--json", action="store_true", help="print hits as JSON")


def format_hits(query: str, hits, show_label: bool = True) -> str:
    lines = [f'"{printable(query)}"']
    width = max(2, len(str(max((h.rank for h in hits), default=0))))  # ranks aligned past 99 hits too
    for h in hits:
        extra = f"  vtm {h.vtm:.3f}" if h.vtm is not None else ""
        label = f"  [{printable(h.label)}]" if show_label and h.label else ""
        name = printable(h.name)
        lines.append(
            f"  {h.rank:>{width}}. {name:<28} {h.start_sec:7.2f}-{h.end_sec:7.2f} s  score {h.score:.3f}  "
            f"cos {h.dual:.3f}{extra}{label}"
        )
    return "\n".join(lines)


@reports_runtime_warnings
def run_search(args) -> int:
    from .index import MomentIndex, other_export

    index = MomentIndex(args.index)
    rt = _runtime(args, args.engines or index.data["engines"])
    note = other_export(index.data, rt)
    if note:
        print(note, file=sys.stderr)
    if len(index) == 0:
        print(
            f"note: {printable(args.index)} holds no clips (no video was indexed): no moment to find", file=sys.stderr
        )
    out = {}
    for q in dict.fromkeys(args.query):  # a query given twice is searched once (the JSON output is keyed by query)
        hits = index.search(rt, q, top=args.top, rerank=args.rerank, rerank_score=args.rerank_score)
        out[q] = hits
        if not args.json:
            print(format_hits(q, hits))
    stale = index.changed_since_indexed([h.video for hits in out.values() for h in hits])
    if stale:
        shown = ", ".join(printable(p) for p in stale[:3]) + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
        print(
            f"note: {len(stale)} of the videos found changed or are gone since they were indexed ({shown}): their "
            f"moments are the indexed file's; rerun `egovlp-deploy index` on them (`--prune` drops the gone ones)",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps({q: [h.to_dict() for h in hs] for q, hs in out.items()}, indent=2))
    else:
        _print_backend(rt)
    return 0


# -- mcq --------------------------------------------------------------------------------------------------------
def add_mcq_arguments(p) -> None:
    p.add_argument("questions", metavar="JSON", help="EgoMCQ questions (official egomcq.json format)")
    p.add_argument("--video-root", required=True, metavar="DIR", help="videos as DIR/<video_uid>/<chunk>.mp4")
    _engine_options(p)
    p.add_argument("--max-questions", type=positive_int, metavar="N", help="answer only the first N")
    p.add_argument("--decoder", choices=("auto", "decord", "pyav"), default="auto", help="video decoder")
    p.add_argument(
        "--out",
        metavar="FILE",
        help="write every answer and score as JSON; answers are recorded as they are made in FILE.partial.jsonl, "
        "and a rerun of the same command resumes from there",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def format_mcq(summary: dict) -> str:
    lines = [f"{'mode':<10}{'all %':>8}{'inter %':>9}{'intra %':>9}"]
    for mode, acc in summary["accuracy"].items():
        lines.append(
            f"{mode:<10}{acc.get('all', float('nan')):>8.1f}{acc.get('Inter-video', float('nan')):>9.1f}"
            f"{acc.get('Intra-video', float('nan')):>9.1f}"
        )
    return "\n".join(lines)


@reports_runtime_warnings
def run_mcq(args) -> int:
    from egovlp_deploy.checkpoint import atomic_write_bytes, check_output_file

    from .mcq import answer_mcq, progress_path, remove_progress

    # the answers are written after every question is read: a path that cannot take them would lose the run, so
    # it is checked before any engine loads or video is read; the progress file beside it shares its folder
    progress_file = None
    if args.out:
        inputs = (("questions", args.questions), ("--engines", args.engines), ("--tokenizer", args.tokenizer))
        check_output_file(args.out, "--out", tuple((label, path) for label, path in inputs if path))
        progress_file = progress_path(args.out)
    rt = _runtime(args)
    summary = answer_mcq(
        args.questions,
        args.video_root,
        rt,
        args.max_questions,
        progress=not args.json,
        decode_backend=args.decoder,
        progress_file=progress_file,
    )
    if args.out:
        atomic_write_bytes(Path(args.out), json.dumps(summary, indent=1).encode())
        remove_progress(progress_file)  # after the answers are in FILE: a kill in between resumes with all answered
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=2))
        return 0
    print(f"EgoMCQ: {summary['questions']} questions in {summary['seconds']:.1f} s (chance 20%)")
    print(format_mcq(summary))
    _print_backend(rt)
    return 0


# -- features ---------------------------------------------------------------------------------------------------
def add_features_arguments(p) -> None:
    p.add_argument(
        "videos",
        nargs="+",
        metavar="VIDEO",
        help="video files, folders (searched recursively for video files) or glob patterns",
    )
    _failure_options(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (one file set per video)")
    p.add_argument(
        "--mode",
        choices=("dual", "fusion"),
        default="dual",
        help="dual: EgoMQ features (default); fusion: EgoNLQ features per query",
    )
    p.add_argument(
        "--frames",
        type=int,
        default=16,
        metavar="F",
        help="window length in source frames (default: 16, the official feature convention)",
    )
    p.add_argument("--stride", type=int, default=16, metavar="S", help="window step in source frames (default: 16)")
    p.add_argument("--query", action="append", default=[], metavar="TEXT", help="fusion mode: a query (repeatable)")
    p.add_argument("--queries", metavar="FILE", help="fusion mode: a text file with one query per line")
    p.add_argument(
        "--format",
        choices=("safetensors", "npy"),
        default="safetensors",
        help="safetensors (default: one file per video) or one .npy per tensor",
    )
    p.add_argument("--batch", type=positive_int, default=8, metavar="B", help="windows per call (default: 8)")
    p.add_argument(
        "--commit-every",
        type=positive_int,
        default=32,
        metavar="N",
        help="windows per committed part of a video: at most N are recomputed after a kill (default: 32)",
    )
    p.add_argument("--decoder", choices=("auto", "decord", "pyav"), default="auto", help="video decoder")
    _engine_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


@reports_runtime_warnings
def run_features(args) -> int:
    from .features import extract_features

    queries = list(args.query)
    if args.queries:
        try:
            raw = Path(args.queries).read_bytes()
            if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                raise ValueError(f"{args.queries}: the queries file is UTF-16 text; save it as UTF-8")
            # utf-8-sig: the byte order mark some editors write first is no part of the first query
            text = raw.decode("utf-8-sig")
        except FileNotFoundError as exc:
            raise ValueError(f"{args.queries}: no such queries file") from exc
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{args.queries}: the queries file is not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from exc
        except OSError as exc:
            raise ValueError(f"{args.queries}: the queries file cannot be read ({exc.strerror or exc})") from exc
        queries += [line.strip() for line in text.splitlines() if line.strip()]
    rt = _runtime(args)
    summary = extract_features(
        args.videos,
        rt,
        args.out,
        args.mode,
        args.frames,
        args.stride,
        queries,
        args.format,
        args.batch,
        progress=not (args.quiet or args.json),
        decode_backend=args.decoder,
        commit_every=args.commit_every,
    )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"features ({summary['mode']}) -> {summary['out']}: {summary['written']} videos written "
            f"({summary['windows']} windows), {summary['skipped']} already done, {summary['seconds']:.1f} s"
        )
    _report_notes(summary)
    return _report_failures(summary, args)


# -- registration -----------------------------------------------------------------------------------------------
def register(sub) -> None:
    """Add index, search, mcq and features to the `egovlp-deploy` subparsers."""
    raw = argparse.RawDescriptionHelpFormatter
    for name, summary, desc, add, run in (
        (
            "index",
            "index videos for text search (clip embeddings + timestamps, resumable)",
            INDEX_DESCRIPTION,
            add_index_arguments,
            run_index,
        ),
        (
            "search",
            "text -> top moments of an index, optional fusion re-ranking",
            SEARCH_DESCRIPTION,
            add_search_arguments,
            run_search,
        ),
        ("mcq", "answer EgoMCQ-style questions with the exported engines", MCQ_DESCRIPTION, add_mcq_arguments, run_mcq),
        (
            "features",
            "per-window EgoMQ (dual) / EgoNLQ (fusion) features of your videos",
            FEATURES_DESCRIPTION,
            add_features_arguments,
            run_features,
        ),
    ):
        p = sub.add_parser(name, help=summary, description=desc, formatter_class=raw)
        add(p)
        p.set_defaults(func=run)
