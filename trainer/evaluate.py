"""`egovlp-deploy eval`: EgoMCQ (dual, fusion, ensemble) and zero-shot EK-100 MIR and Charades-Ego of any model the
model factory loads, on the official evaluation files (egovlp_deploy/evaluation.py does the work)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from egovlp_deploy.arg_types import positive_int
from egovlp_deploy.checkpoint import atomic_write_bytes
from egovlp_deploy.evaluation import (
    CHARADES_FRAMES,
    EPIC_FRAMES,
    charades_test_dataset,
    epic_test_dataset,
    evaluate_charades,
    evaluate_egomcq,
    evaluate_epic_mir,
    format_retrieval,
    format_table,
    skipped_note,
)
from egovlp_deploy.model.factory import load_model, model_at_frames

from .distributed import resolve_device


# -- command line ---------------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="a save_pretrained directory, a training checkpoint (runs/x/checkpoints/step_N), a "
        "training run directory (its newest valid checkpoint) or an official .pth file",
    )
    parser.add_argument("--egomcq", metavar="JSON", help="EgoMCQ questions (official format)")
    parser.add_argument(
        "--video-root",
        metavar="DIR",
        help="EgoMCQ's chunked videos: DIR/{video_uid}/{chunk}.mp4 (needed with --egomcq)",
    )
    parser.add_argument(
        "--epic-mir",
        metavar="DIR",
        help="zero-shot EK-100 multi-instance retrieval on the test split of this retrieval "
        "annotation directory: EPIC_100_retrieval_test.csv, EPIC_100_retrieval_test_sentence.csv, "
        "relevancy/caption_relevancy_EPIC_100_retrieval_test.npy (the .pkl converted once)",
    )
    parser.add_argument(
        "--epic-video-root",
        metavar="DIR",
        help="EK-100 videos: DIR/{participant_id}/{video_id}.MP4 (default: DIR/videos of --epic-mir)",
    )
    parser.add_argument(
        "--charades",
        metavar="DIR",
        help="zero-shot Charades-Ego action recognition on the test split of this annotation "
        "directory: CharadesEgo_v1_test_only1st.csv and Charades_v1_classes.txt (the prompts)",
    )
    parser.add_argument(
        "--charades-video-root",
        metavar="DIR",
        help="Charades-Ego videos: DIR/{id}.mp4 (default: DIR/videos of --charades)",
    )
    parser.add_argument(
        "--charades-classes",
        type=int,
        default=157,
        metavar="N",
        help="number of classes in Charades_v1_classes.txt (default: 157)",
    )
    parser.add_argument(
        "--tokenizer",
        required=True,
        metavar="DIR",
        help="tokenizer directory (a training run keeps its demo tokenizer in RUN/tokenizer)",
    )
    parser.add_argument(
        "--frames",
        type=int,
        metavar="F",
        help=f"frames per clip for every benchmark (default: the model's for EgoMCQ, paper: 16; "
        f"{EPIC_FRAMES} for EK-100 MIR and {CHARADES_FRAMES} for Charades-Ego, as the official "
        f"evaluation configs)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=4,
        metavar="Q",
        help="EgoMCQ questions, or EK-100 / Charades-Ego clips, per step (default: 4)",
    )
    parser.add_argument(
        "--max-questions", type=positive_int, metavar="N", help="evaluate only the first N questions (N >= 1)"
    )
    parser.add_argument(
        "--predictions",
        metavar="FILE",
        help="write each EgoMCQ question's chosen clip per mode to FILE as JSON: {key: {mode: choice index}}",
    )
    parser.add_argument("--lax", action="store_true", help="black frames instead of an error for unreadable videos")
    parser.add_argument(
        "--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N (default: auto)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the result as JSON: EgoMCQ's alone, else {'egomcq', 'epic_mir', 'charades'} for the benchmarks run",
    )


def run(args) -> int:
    import json

    from egovlp_deploy.config import check_num_frames
    from egovlp_deploy.data.egomcq import EgoMCQDataset
    from egovlp_deploy.tokenizer import load_tokenizer

    check_benchmark_arguments(args)  # before the model is loaded
    device = resolve_device(args.device)
    if args.frames is not None:
        check_num_frames(args.frames, "--frames")  # before the model is loaded or resized to that many frames
    model, _ = load_model(args.model, frames=args.frames)
    frames = args.frames or model.config.video.num_frames
    model = model.to(device)  # load_model gave it `frames` frames
    tokenizer, size, strict = load_tokenizer(args.tokenizer), model.config.video.img_size, not args.lax
    # Every benchmark's files are read before the first one runs: a wrong path or class count is an error before any
    # work, not after the benchmarks before it (whose results would be lost).
    epic_frames, charades_frames = args.frames or EPIC_FRAMES, args.frames or CHARADES_FRAMES
    egomcq_set = EgoMCQDataset(args.egomcq, args.video_root, frames, size, strict=strict) if args.egomcq else None
    epic_set = charades_set = None
    if args.epic_mir:
        epic_set = epic_test_dataset(
            args.epic_mir, args.epic_video_root or Path(args.epic_mir, "videos"), epic_frames, size, strict=strict
        )
    if args.charades:
        charades_set = charades_test_dataset(
            args.charades,
            args.charades_video_root or Path(args.charades, "videos"),
            charades_frames,
            size,
            args.charades_classes,
            strict=strict,
        )
    for name, dataset in (("EK-100 MIR", epic_set), ("Charades-Ego", charades_set)):
        note = skipped_note(name, dataset) if dataset is not None else None
        if note:  # before the work: a subset's numbers must not pass for the benchmark's
            print(note, file=sys.stderr)
    results, report = {}, []
    if egomcq_set is not None:
        predictions = {} if args.predictions else None
        results["egomcq"] = evaluate_egomcq(
            model,
            egomcq_set,
            tokenizer,
            device,
            args.batch_size,
            max_questions=args.max_questions,
            progress=not args.json,
            predictions=predictions,
        )
        if predictions is not None:
            atomic_write_bytes(args.predictions, json.dumps(predictions, indent=1).encode())
        report += [
            f"EgoMCQ on {len(egomcq_set) if args.max_questions is None else args.max_questions} questions, "
            f"{frames} frames",
            format_table(results["egomcq"]),
        ]
    if epic_set is not None:
        results["epic_mir"] = evaluate_epic_mir(
            model_at_frames(model, epic_frames), epic_set, tokenizer, device, args.batch_size, progress=not args.json
        )
        report += [
            f"EK-100 MIR (zero-shot) on {len(epic_set)} clips, {epic_frames} frames, dual encoder, percent",
            format_retrieval("epic_mir", results["epic_mir"]),
        ]
    if charades_set is not None:
        results["charades"] = evaluate_charades(
            model_at_frames(model, charades_frames),
            charades_set,
            tokenizer,
            device,
            batch_size=args.batch_size,
            progress=not args.json,
        )
        report += [
            f"Charades-Ego (zero-shot) on {len(charades_set)} videos, {args.charades_classes} classes, "
            f"{charades_frames} frames, dual encoder, percent",
            format_retrieval("charades", results["charades"]),
        ]
    if args.json:
        print(json.dumps(results["egomcq"] if list(results) == ["egomcq"] else results, indent=2))
    else:
        print("\n".join(report))
    return 0


def check_benchmark_arguments(args) -> None:
    """At least one benchmark, with the inputs it needs (ValueError: the CLI prints it and exits 2)."""
    if not (args.egomcq or args.epic_mir or args.charades):
        raise ValueError("nothing to evaluate: give --egomcq, --epic-mir and/or --charades")
    if args.egomcq and not args.video_root:
        raise ValueError("--egomcq needs --video-root (the chunked EgoClip videos)")
    if args.predictions and not args.egomcq:
        raise ValueError("--predictions holds EgoMCQ answers: it needs --egomcq")
    if args.predictions and not Path(args.predictions).resolve().parent.is_dir():
        raise ValueError(f"--predictions {args.predictions}: its folder does not exist")
    # the answers are written after every question is scored: a path that cannot take them would lose the run
    if args.predictions and Path(args.predictions).is_dir():
        raise ValueError(f"--predictions {args.predictions}: is a folder, not a file")
    if args.predictions and not os.access(Path(args.predictions).resolve().parent, os.W_OK | os.X_OK):
        raise ValueError(f"--predictions {args.predictions}: its folder is not writable")
    if args.charades_classes < 1:
        raise ValueError(f"--charades-classes must be positive, got {args.charades_classes}")
