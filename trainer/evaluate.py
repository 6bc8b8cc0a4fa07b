"""`egovlp-deploy eval`: EgoMCQ (dual, fusion, ensemble), EK-100 MIR and Charades-Ego of any model the model factory
loads, on the official evaluation files (egovlp_deploy/evaluation.py does the work). The report's header says whether
the model was fine-tuned on EK-100 MIR / Charades-Ego, where its checkpoint records its training (`regime`).

With --resume-dir DIR each benchmark's per-item outputs are committed to DIR/<benchmark>/ as they are made
(`eval_work.EvalWork`), under an identity (`eval_work.work_identity`) of everything that decides them: a rerun of the
same command encodes only what is missing and prints the numbers an uninterrupted run at its batch size prints; a run
of another model, annotation file, video file, frame count, ... is refused before any work. The folders are removed
once the report is printed."""

from __future__ import annotations

import sys
from pathlib import Path

from egovlp_deploy.arg_types import non_negative_int, positive_int
from egovlp_deploy.checkpoint import atomic_write_bytes, check_output_file
from egovlp_deploy.eval_work import EvalWork, work_identity
from egovlp_deploy.evaluation import (
    CHARADES_FRAMES,
    EPIC_FRAMES,
    charades_test_dataset,
    charades_test_files,
    epic_test_dataset,
    evaluate_charades,
    evaluate_egomcq,
    evaluate_epic_mir,
    format_retrieval,
    format_table,
    load_failure_note,
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
        help="EK-100 multi-instance retrieval (zero-shot, or after fine-tuning) on the test split of this retrieval "
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
        help="Charades-Ego action recognition (zero-shot, or after fine-tuning) on the test split of this annotation "
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
        "--workers",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="DataLoader processes decoding the videos while the model runs (default: 0, decoded in this process); "
        "on a GPU, the full EgoMCQ set (about 200k clips) needs several to keep it busy. The results do not "
        "depend on it",
    )
    parser.add_argument(
        "--resume-dir",
        metavar="DIR",
        help="keep the work in DIR (created if missing) so that an interrupted run (Ctrl-C, SIGTERM, out of memory, "
        "a preempted job) resumes: each benchmark's scores / embeddings are committed to DIR/<benchmark>/ every "
        "few hundred items or minute, and rerunning the same command encodes only what is missing and prints the "
        "numbers of an uninterrupted run at the same --batch-size (--workers may change; another --batch-size, e.g. "
        "after running out of memory, is taken with a note: the numbers may then differ in the last digits). A "
        "rerun with another model, annotation file, --frames, --tokenizer, --lax, --max-questions, video folder, "
        "video file (a new size or modification time) or device is refused before any work. The "
        "files are removed once the report is printed; other files in DIR are never touched. Recommended for the "
        "full sets (EgoMCQ: about 200k clips)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N (default: auto)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the result as JSON: EgoMCQ's alone, else {'egomcq', 'epic_mir', 'charades'} for the benchmarks run",
    )


def run(args) -> int:
    from egovlp_deploy.config import check_num_frames
    from egovlp_deploy.data.egomcq import EgoMCQDataset
    from egovlp_deploy.tokenizer import load_tokenizer

    check_benchmark_arguments(args)  # before the model is loaded
    device = resolve_device(args.device)
    if args.frames is not None:
        check_num_frames(args.frames, "--frames")  # before the model is loaded or resized to that many frames
    model, source = load_model(args.model, frames=args.frames)
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
    benchmarks = (("EgoMCQ", egomcq_set, "questions"), ("EK-100 MIR", epic_set, "test rows"))
    for name, dataset, unit in (*benchmarks, ("Charades-Ego", charades_set, "test rows")):
        note = skipped_note(name, dataset, unit) if dataset is not None else None
        if note:  # before the work: a subset's numbers must not pass for the benchmark's
            print(note, file=sys.stderr)
    if not args.resume_dir:
        return _evaluate(args, model, source, tokenizer, device, frames, egomcq_set, epic_set, charades_set, {})
    from egovlp_deploy.folder_lock import exclusive_writer

    root = Path(args.resume_dir)  # not a folder: refused by check_benchmark_arguments
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_writer(root, "eval work folder", ValueError, "rerun this command: what it kept is used"):
        work = {}
        for name, dataset, bench_frames in (
            ("egomcq", egomcq_set, frames),
            ("epic_mir", epic_set, epic_frames),
            ("charades", charades_set, charades_frames),
        ):
            if dataset is not None:
                work[name] = EvalWork(root, name, _work_identity(name, dataset, bench_frames, args, source, device))
                work[name].check()  # every benchmark's, before the first one runs: another run's work is not mixed
        code = _evaluate(args, model, source, tokenizer, device, frames, egomcq_set, epic_set, charades_set, work)
        sys.stdout.flush()  # the report is out before the work it came from is deleted
        for w in work.values():
            w.remove()
    if created:
        try:
            root.rmdir()  # made by this run, and empty
        except OSError:
            pass
    return code


def _evaluate(args, model, source, tokenizer, device, frames, egomcq_set, epic_set, charades_set, work) -> int:
    """Run the benchmarks whose datasets are given and print the report; `work`: {benchmark: EvalWork}."""
    import json

    epic_frames, charades_frames = args.frames or EPIC_FRAMES, args.frames or CHARADES_FRAMES
    results, report = {}, []
    if egomcq_set is not None:
        predictions, egomcq_loads = {} if args.predictions else None, {}
        results["egomcq"] = evaluate_egomcq(
            model,
            egomcq_set,
            tokenizer,
            device,
            args.batch_size,
            args.workers,
            max_questions=args.max_questions,
            progress=not args.json,
            predictions=predictions,
            load_counts=egomcq_loads,
            work=work.get("egomcq"),
        )
        if predictions is not None:
            atomic_write_bytes(args.predictions, json.dumps(predictions, indent=1).encode())
        scored = len(egomcq_set) if args.max_questions is None else min(args.max_questions, len(egomcq_set))
        report += [f"EgoMCQ on {scored} questions, {frames} frames", format_table(results["egomcq"])]
        _print_load_failures("EgoMCQ", egomcq_set, egomcq_loads)
    if epic_set is not None:
        epic_loads: dict = {}
        results["epic_mir"] = evaluate_epic_mir(
            model_at_frames(model, epic_frames),
            epic_set,
            tokenizer,
            device,
            args.batch_size,
            args.workers,
            progress=not args.json,
            load_counts=epic_loads,
            work=work.get("epic_mir"),
        )
        report += [
            f"EK-100 MIR ({regime(source, 'epic_mir')}) on {len(epic_set)} clips, {epic_frames} frames, dual "
            "encoder, percent",
            format_retrieval("epic_mir", results["epic_mir"]),
        ]
        _print_load_failures("EK-100 MIR", epic_set, epic_loads)
    if charades_set is not None:
        charades_loads: dict = {}
        results["charades"] = evaluate_charades(
            model_at_frames(model, charades_frames),
            charades_set,
            tokenizer,
            device,
            batch_size=args.batch_size,
            num_workers=args.workers,
            progress=not args.json,
            load_counts=charades_loads,
            work=work.get("charades"),
        )
        report += [
            f"Charades-Ego ({regime(source, 'charades')}) on {len(charades_set)} videos, {args.charades_classes} "
            f"classes, {charades_frames} frames, dual encoder, percent",
            format_retrieval("charades", results["charades"]),
        ]
        _print_load_failures("Charades-Ego", charades_set, charades_loads)
    if args.json:
        print(json.dumps(results["egomcq"] if list(results) == ["egomcq"] else results, indent=2))
    else:
        print("\n".join(report))
    return 0


def _work_identity(benchmark: str, dataset, frames: int, args, source: dict, device) -> dict:
    """`eval_work.work_identity` of a benchmark's work under these arguments: its annotation files, as the
    *_test_dataset functions name them, and its own options."""
    from egovlp_deploy.data.epic import split_files

    if benchmark == "egomcq":
        files, options = {"questions": args.egomcq}, {"max_questions": args.max_questions}
    elif benchmark == "epic_mir":
        files, options = split_files(args.epic_mir, "test"), {}
    else:
        files, options = charades_test_files(args.charades), {"classes": args.charades_classes}
    model = source.get("sha256") or str(source.get("path"))
    return work_identity(
        benchmark,
        dataset,
        files,
        model=model,
        frames=frames,
        tokenizer_dir=args.tokenizer,
        device=device,
        lax=args.lax,
        **options,
    )


def check_benchmark_arguments(args) -> None:
    """At least one benchmark, with the inputs it needs (ValueError: the CLI prints it and exits 2)."""
    if not (args.egomcq or args.epic_mir or args.charades):
        raise ValueError("nothing to evaluate: give --egomcq, --epic-mir and/or --charades")
    if args.egomcq and not args.video_root:
        raise ValueError("--egomcq needs --video-root (the chunked EgoClip videos)")
    if args.predictions and not args.egomcq:
        raise ValueError("--predictions holds EgoMCQ answers: it needs --egomcq")
    # the answers are written after every question is scored: a path that cannot take them would lose the run
    if args.predictions:
        check_output_file(args.predictions, "--predictions", (("--egomcq", args.egomcq), ("--model", args.model)))
    if args.charades_classes < 1:
        raise ValueError(f"--charades-classes must be positive, got {args.charades_classes}")
    resume = getattr(args, "resume_dir", None)
    if resume and Path(resume).exists() and not Path(resume).is_dir():  # before the model is loaded
        raise ValueError(f"--resume-dir {resume}: exists and is not a folder")


def _print_load_failures(name: str, dataset, load_counts: dict) -> None:
    note = load_failure_note(name, dataset, load_counts)
    if note:
        print(note, file=sys.stderr)


# -- what the evaluated model was trained on --------------------------------------------------------------------------
BENCHMARK_NAMES = {"epic_mir": "EK-100 MIR", "charades": "Charades-Ego"}


def regime(source: dict, benchmark: str) -> str:
    """How the model stands to `benchmark` ('epic_mir' or 'charades'), for the report's header: 'zero-shot' only
    where its training is recorded (trainer checkpoints: their run.json, and that of a trainer checkpoint it
    started from) and none of it fine-tuned on the benchmark."""
    if source.get("kind") == "random":
        return "random weights"
    tasks, complete = recorded_tasks(Path(source["path"])) if source.get("kind") == "trainer" else (set(), False)
    if benchmark in tasks:
        return f"fine-tuned on {BENCHMARK_NAMES[benchmark]}"
    if complete:
        return "zero-shot"
    return "zero-shot if not fine-tuned on it: training not recorded"


def recorded_tasks(checkpoint: Path, depth: int = 8) -> tuple[set[str], bool]:
    """(the tasks of the runs that trained a trainer checkpoint, whether that record goes back to the start): its
    run.json's task, then those of the trainer checkpoint its model.init_from names, while that can be read."""
    from egovlp_deploy.jsonfile import read_json
    from egovlp_deploy.model.factory import checkpoint_kind

    try:
        run = read_json(checkpoint / "run.json", expect=dict)
    except ValueError:
        return set(), False
    task, model = run.get("task"), run.get("model")
    if not isinstance(task, str) or not isinstance(model, dict):
        return set(), False
    tasks = {task}
    init_from = model.get("init_from")
    if init_from is None:
        return tasks, True
    init = Path(str(init_from))
    if init.name == "model.safetensors":
        init = init.parent
    kind = checkpoint_kind(init) if init.exists() else None
    if kind == "run":
        from egovlp_deploy.checkpoint import latest_valid_checkpoint

        init, kind = latest_valid_checkpoint(init / "checkpoints"), "trainer"
    if kind != "trainer" or init is None or depth <= 0:
        return tasks, False
    earlier, complete = recorded_tasks(init, depth - 1)
    return tasks | earlier, complete
