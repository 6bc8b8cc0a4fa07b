"""The `egovlp-deploy` command. Each subcommand is a `main(argv)`-callable function, so tests drive it directly."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import signal
import sys
import threading
import traceback
from importlib import metadata

PACKAGES = (
    "torch",
    "triton",
    "transformers",
    "tokenizers",
    "safetensors",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxscript",
    "tensorrt",
    "decord",
    "av",
    "numpy",
)

# Modules of an optional extra (pyproject.toml): a command that needs one the installation lacks says which extra.
EXTRA_OF_MODULE = {"onnxruntime": "the cpu or gpu extra: pip install 'egovlp-deploy[cpu]'"}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _environment() -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        env["onnxruntime_providers"] = []
    try:
        native = importlib.import_module("egovlp_deploy._C")
        env["native_extension"] = dict(native.build_info())
    except ImportError as exc:
        env["native_extension"] = f"not built ({exc})"
    return env


def _model_config(args):
    from .config import EgoVLPv2Config

    if args.config_file:
        return EgoVLPv2Config.from_json_file(args.config_file).with_num_frames(args.frames or 4), "file"
    if args.model == "base":
        return EgoVLPv2Config.base(num_frames=args.frames or 4, projection=args.projection), "base"
    return EgoVLPv2Config.tiny(num_frames=args.frames or 4), "tiny"


def cmd_info(args) -> int:
    if args.path:
        return describe_artifact(args)
    if args.engines:
        raise ValueError("--engines compares an index with an engines folder: give the index as PATH")
    from .compute import compute_report

    env = _environment()
    config, name = _model_config(args)
    report = compute_report(config, text_length=args.text_length, config_name=name)
    if args.json:
        print(
            json.dumps(
                {
                    "environment": env,
                    "model": {
                        "config": name,
                        "num_frames": report.num_frames,
                        "text_length": report.text_length,
                        "params": report.params,
                        "gmacs": report.gmacs,
                        "cross_attention_gmacs": report.cross_attention_gmacs,
                    },
                },
                indent=2,
            )
        )
        return 0
    print("egovlp-deploy environment")
    print(f"  python            {env['python']} on {env['platform']}")
    for pkg, ver in env["packages"].items():
        print(f"  {pkg:<17} {ver or '-'}")
    devices = ", ".join(env["cuda_devices"]) or "none"
    print(f"  CUDA              {'yes' if env['cuda_available'] else 'no'} (devices: {devices})")
    print(f"  CPU threads       {env['cpu_threads']}")
    print(f"  ORT providers     {', '.join(env['onnxruntime_providers']) or '-'}")
    native = env["native_extension"]
    if isinstance(native, dict):
        openmp = "on" if native["openmp"] else "off"
        native = f"{native['compiler']}, C++{str(native['cplusplus'])[2:4]}, OpenMP {openmp}"
    print(f"  native extension  {native}")
    print()
    print(
        f"model: {name} ({config.projection} projection), {report.num_frames} frames of "
        f"{config.video.img_size}px, text length {report.text_length}, batch 1"
    )
    width = max(len(label) for label, _ in report.rows())
    for label, value in report.rows():
        print(f"  {label:<{width}}  {value:>10}")
    return 0


def describe_artifact(args) -> int:
    """`info PATH`: a checkpoint, an engines folder or an index, described from its JSON files and safetensors
    headers (artifact_info.py documents the --json fields in `describe`)."""
    from .artifact_info import describe, format_description

    description = describe(args.path, engines=args.engines)
    if args.json:
        print(json.dumps(description, indent=2))
    else:  # file names that are not UTF-8 keep their bytes as \x escapes
        print(os.fsencode(format_description(description)).decode("utf-8", "backslashreplace"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egovlp-deploy",
        description="EgoVLPv2 as a dual or fusion encoder: model info, synthetic data, training and evaluation, "
        "validated export (ONNX, TensorRT, AOTInductor), on-device retrieval with fusion re-ranking, "
        "feature extraction, the one-command demo, and benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = sub.add_parser(
        "info",
        help="versions, devices and model counts; or what a checkpoint, an engines folder or an index holds",
        description="Without PATH: print package versions, available devices and ONNX Runtime "
        "providers, the native extension's build, and parameter/GMAC counts of the "
        "dual and fusion forwards (batch 1, counted on the meta device: no weights are "
        "allocated). With PATH: describe a checkpoint (a save_pretrained folder, a "
        "trainer step_N, or a training run: its newest checkpoint), an engines folder "
        "(roles, precisions, inputs/outputs, model id, validation, tokenizer) or an "
        "index (videos, clips, model id, settings, engines), reading only JSON files "
        "and safetensors headers.",
    )
    info.add_argument(
        "path", nargs="?", metavar="PATH", help="a checkpoint folder, training run, engines folder or index to describe"
    )
    info.add_argument(
        "--engines",
        metavar="DIR",
        help="with an index as PATH: compare it with these engines (default: the ones it records)",
    )
    model = info.add_argument_group("model")
    model.add_argument(
        "--model",
        choices=("base", "tiny"),
        default="base",
        help="paper-size model or the tiny CPU model (default: base)",
    )
    model.add_argument("--config-file", metavar="JSON", help="a model config.json instead of --model")
    model.add_argument(
        "--projection",
        choices=("big", "small"),
        default="big",
        help="base model's EgoNCE projection: big 4096 (EgoVLPv2.pth) or small 256 (default: big)",
    )
    model.add_argument("--frames", type=int, metavar="F", help="frames per clip (default: 4, the pre-training count)")
    model.add_argument(
        "--text-length",
        type=int,
        default=15,
        metavar="L",
        help="tokens per sentence (default: 15, the pre-training length)",
    )
    info.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    info.set_defaults(func=cmd_info)

    from .data import synth
    from .export import commands as export_commands
    from .trainer import evaluate, train

    add_module_command(
        sub,
        "synth",
        synth,
        "render the built-in synthetic egocentric dataset (EgoClip/EgoMCQ format)",
        epilog=synth.EPILOG,
    )
    add_module_command(
        sub,
        "train",
        train,
        "pre-train EgoVLPv2 (EgoNCE + MLM + VTM); resumable; torchrun for many GPUs",
        description=train.__doc__,
    )
    add_module_command(
        sub,
        "eval",
        evaluate,
        "EgoMCQ accuracy (dual, fusion, ensemble); EK-100 MIR and Charades-Ego",
        description="Evaluate a model on EgoMCQ (inter- and intra-video accuracy) in the three modes "
        "of the official validation: dual (cosine), fusion (VTM probability), ensemble; "
        "and, with the dual encoder, on the official EK-100 multi-instance "
        "retrieval test split (nDCG and mAP) and Charades-Ego test split (mAP over the "
        "class prompts), zero-shot or after fine-tuning (the header says which, where the checkpoint records it).",
        raw=False,
    )
    add_module_command(
        sub, "export", export_commands, "validated ONNX / TensorRT / AOTInductor artifacts + manifest.json"
    )

    from .runtime import commands as runtime_commands

    runtime_commands.register(sub)  # index, search, mcq, features
    from . import demo

    add_module_command(
        sub, "demo", demo, "synthetic data -> train -> export -> index/search/MCQ -> latency, in minutes"
    )
    add_bench_commands(sub)
    return parser


def add_module_command(
    sub, name: str, module, help: str, description: str | None = None, epilog: str | None = None, raw: bool = True
):
    """A subcommand served by a module with add_arguments(parser) and run(args) -> int (and, by default, its
    DESCRIPTION as the --help text, printed as written)."""
    formatter = argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter
    p = sub.add_parser(
        name,
        help=help,
        description=module.DESCRIPTION if description is None else description,
        epilog=epilog,
        formatter_class=formatter,
    )
    module.add_arguments(p)
    p.set_defaults(func=module.run)
    return p


# `egovlp-deploy bench TARGET`: each target is a module with DESCRIPTION, add_arguments(parser) and run(args) -> int.
BENCH_TARGETS = {
    "kernels": ("egovlp_deploy.kernels.bench.kernel_bench", "Triton attention kernels vs reference, SDPA, compile"),
    "profile": ("egovlp_deploy.kernels.bench.encoder_profile", "where the dual video encoder's time goes (profiler)"),
    "preprocess": ("egovlp_deploy.kernels.bench.preprocess_bench", "C++ clip preprocessing vs the torch reference"),
    "export": ("egovlp_deploy.export.bench", "exported artifacts at B=1: ONNX Runtime CPU fp32/int8 vs PyTorch eager"),
    "e2e": ("egovlp_deploy.bench_e2e", "end to end: decode+preprocess, encoders, cached vs monolithic re-rank"),
    "index": ("egovlp_deploy.bench_index", "indexing a 720p H.264 file vs the decoder's own speed"),
}


def add_bench_commands(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="benchmarks: JSON + markdown table + PNG plot per run",
        description="Run a benchmark; each writes JSON, a markdown table and a PNG plot, and "
        "records the machine and device (protocol in BENCHMARKS.md).",
    )
    targets = bench.add_subparsers(dest="target", metavar="TARGET", required=True)
    for name, (module_name, summary) in BENCH_TARGETS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module_name.startswith(exc.name):
                raise
            continue  # not part of this build
        add_module_command(targets, name, module, summary)


def main(argv: list[str] | None = None) -> int:
    """Run one command. An expected failure is one line on stderr and an exit status: 2 for a bad input (our errors
    are ValueErrors that name the problem; OSErrors name the file), 1 for a training run that cannot go on
    (TrainingError), 130/143 for Ctrl-C/SIGTERM. EGOVLP_DEBUG=1 prints the traceback as well."""
    from .trainer.train import TrainingError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "frames", None) is not None and args.frames <= 0:
        parser.error("--frames must be positive")
    if getattr(args, "text_length", 1) <= 0:
        parser.error("--text-length must be positive")
    from .cache_dirs import usable_cache_dirs

    usable_cache_dirs()  # an unwritable compile cache (TORCHINDUCTOR_CACHE_DIR, a read-only HOME) fails no command
    previous = _stop_on_sigterm()
    try:
        return args.func(args)
    except BrokenPipeError:
        # the reader of our output has gone (`search ... | head -1`): stop quietly, as a command killed by SIGPIPE
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF_MODULE.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        if os.environ.get("EGOVLP_DEBUG"):
            traceback.print_exc()
        message = f"{exc.name} is not installed (it comes with {extra})"
        print(f"egovlp-deploy {args.command}: error: {message}", file=sys.stderr)
        return 2
    except (ValueError, OSError, TrainingError) as exc:
        if os.environ.get("EGOVLP_DEBUG"):
            traceback.print_exc()
        print(f"egovlp-deploy {args.command}: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, TrainingError) else 2
    except (KeyboardInterrupt, Terminated) as exc:
        code = 143 if isinstance(exc, Terminated) else 130
        print(f"\negovlp-deploy {args.command}: interrupted; {after_interrupt(args.command)}", file=sys.stderr)
        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def after_interrupt(command: str) -> str:
    """What an interrupted command leaves and how to go on. Every command writes atomically, so nothing is left
    half-written; index, features, mcq --out and train (with --resume) continue where they stopped."""
    advice = {
        "index": "finished work is kept, rerun the same command to continue",
        "features": "finished work is kept, rerun the same command to continue",
        "train": "its checkpoints are kept, rerun it with --resume to continue from the newest",
        "export": "rerun the same command to finish it: it keeps the artifacts already made and validated (the "
        "runtime refuses an unfinished export folder)",
        "bench": "the rows measured so far are kept, marked incomplete; a rerun starts over",
        "synth": "nothing was written (the dataset is moved into place only when complete); rerun it to start again",
        "demo": "rerun it with --force to start again (its folder is not empty now)",
        "mcq": "with --out, the answers so far are kept: rerun the same command to continue (else it starts again)",
        "eval": "with --resume-dir, the work committed so far is kept: rerun the same command to continue",
    }
    return advice.get(command, "nothing half-written is left; rerun it to start again")


class Terminated(BaseException):
    """SIGTERM, raised where the main thread is, so the command stops like on Ctrl-C. A BaseException like
    KeyboardInterrupt: the `except Exception` of a library (the ONNX exporter wraps every Exception it meets) must
    not turn it into an export failure."""


def _stop_on_sigterm():
    """SIGTERM raises Terminated in the main thread; returns the previous handler (None: left as it is). Under
    torchrun (LOCAL_RANK set) SIGTERM keeps its default: the launcher stops a failed job's workers with it, and a
    worker blocked in a collective could not run a Python handler anyway."""
    if threading.current_thread() is not threading.main_thread() or "LOCAL_RANK" in os.environ:
        return None
    pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != pid:  # a forked worker inherited the handler: die as SIGTERM means
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
