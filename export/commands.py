"""`egovlp-deploy export`: a checkpoint -> validated ONNX / TensorRT / AOTInductor / torch.export program artifacts
+ manifest.json.

Roles (one artifact each): video_encoder (dual video embedding), text_encoder (dual text embedding + text prefix
states), video_fusion_prefix (cacheable fusion-mode video states), fusion_head (prefixes -> VTM logits), fusion
(video + text -> VTM logits in one graph). Every artifact is validated against PyTorch at batch/text sizes the
export never traced, and the command fails (exit 1) on a mismatch unless --allow-mismatch.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

from .specs import AOTI_ROLES, FORMATS, PRECISIONS, ROLES

DESCRIPTION = __doc__


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def add_arguments(parser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="CKPT",
        help="a training checkpoint (RUN/checkpoints/step_N) or run directory, a save_pretrained "
        "directory, an official .pth, or random:tiny / random:base (seeded random weights)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (manifest.json goes here)")
    what = parser.add_argument_group("what to export")
    what.add_argument(
        "--format",
        default="onnx",
        metavar="LIST",
        help=f"comma list of {','.join(FORMATS)} (default: onnx; tensorrt needs TensorRT and a GPU)",
    )
    what.add_argument(
        "--precision",
        default="fp32",
        metavar="LIST",
        help=f"comma list of {','.join(PRECISIONS)} (default: fp32). fp16 keeps LayerNorm, softmax "
        "and reductions in fp32; int8 is ONNX Runtime dynamic quantization (CPU)",
    )
    what.add_argument(
        "--roles",
        default=",".join(ROLES),
        metavar="LIST",
        help=f"comma list of roles (default: all: %(default)s); AOTInductor builds {','.join(AOTI_ROLES)}",
    )
    shapes = parser.add_argument_group("shapes")
    shapes.add_argument("--frames", type=int, metavar="F", help="frames per clip (default: the checkpoint's)")
    shapes.add_argument("--max-batch", type=int, default=8, metavar="B", help="largest batch (default: 8)")
    shapes.add_argument(
        "--max-text-len", type=int, default=32, metavar="L", help="longest text in tokens (default: 32)"
    )
    onnx = parser.add_argument_group("ONNX")
    onnx.add_argument("--opset", type=int, default=20, help="ONNX opset, >= 18 (default: 20)")
    onnx.add_argument(
        "--attention",
        choices=("reference", "custom-ops"),
        default="reference",
        help="reference: plain torch attention, standard ONNX ops (default); custom-ops: the "
        "egovlp:: Triton ops through the kernels' ONNX translation table",
    )
    onnx.add_argument(
        "--ort-optimize",
        choices=("auto", "always", "never"),
        default="auto",
        help="save ONNX Runtime's optimized graph as <role>.ort.onnx: auto keeps it where it measures "
        "no slower at batch 1 (default: auto)",
    )
    val = parser.add_argument_group("validation")
    val.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="write the artifacts and report even when validation fails (exit 0)",
    )
    val.add_argument(
        "--egomcq", metavar="JSON", help="EgoMCQ questions for task-level checks (default: random questions)"
    )
    val.add_argument("--video-root", metavar="DIR", help="videos of --egomcq")
    val.add_argument(
        "--tokenizer", metavar="DIR", help="tokenizer directory for --egomcq (a run keeps it in RUN/tokenizer)"
    )
    val.add_argument("--max-questions", type=int, default=24, metavar="N", help="EgoMCQ questions used (default: 24)")
    val.add_argument(
        "--no-task-checks",
        dest="task_checks",
        action="store_false",
        help="skip the task-level checks (retrieval, EgoMCQ answers); every artifact is still compared with torch",
    )
    dev = parser.add_argument_group("TensorRT, AOTInductor and torch.export programs")
    dev.add_argument(
        "--torch-device",
        "--aoti-device",
        dest="torch_device",
        default="cpu",
        help="cpu or cuda: the device AOTInductor packages and programs are built for (default: cpu)",
    )
    dev.add_argument(
        "--aoti-opt-level",
        choices=("O0", "O1"),
        default="O1",
        help="AOTInductor wrapper optimisation (O0 compiles ~3x faster; kernels are unaffected)",
    )
    dev.add_argument(
        "--trt-strongly-typed",
        action="store_true",
        help="strongly typed TensorRT build from the fp16 ONNX (its Casts keep norms in fp32)",
    )
    dev.add_argument("--trt-refit", action="store_true", help="refittable engines (REFIT_IDENTICAL)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args) -> int:
    """Exit 0 when every check passed (or --allow-mismatch), 1 when validation failed or an artifact could not be
    made (ExportError: one line on stderr, the traceback with EGOVLP_DEBUG=1); a bad option or --out is a
    ValueError for the CLI (exit 2)."""
    from .onnx_export import ExportError
    from .runner import ExportOptions, run_export, summary_dict

    opts = ExportOptions(
        formats=_csv(args.format),
        precisions=_csv(args.precision),
        roles=_csv(args.roles),
        frames=args.frames,
        max_batch=args.max_batch,
        max_text_len=args.max_text_len,
        opset=args.opset,
        attention=args.attention,
        allow_mismatch=args.allow_mismatch,
        ort_optimize=args.ort_optimize,
        egomcq=args.egomcq,
        video_root=args.video_root,
        tokenizer=args.tokenizer,
        max_questions=args.max_questions,
        task_checks=args.task_checks,
        torch_device=args.torch_device,
        aoti_opt_level=args.aoti_opt_level,
        trt_strongly_typed=args.trt_strongly_typed,
        trt_refit=args.trt_refit,
    )
    try:
        result = run_export(args.checkpoint, args.out, opts, quiet=args.quiet or args.json)
    except ExportError as exc:
        if os.environ.get("EGOVLP_DEBUG"):
            traceback.print_exc()
        print(f"egovlp-deploy export: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary_dict(result), indent=2))
    else:
        print(f"\nexport to {result.out}: {'all checks passed' if result.passed else 'VALIDATION FAILED'}")
        for a in result.manifest.artifacts:
            v = a.validation
            detail = (
                f"cos {v['min_cosine']:.7f}  rel {v['max_rel']:.1e}"
                if "min_cosine" in v
                else f"{v.get('ms_b1', 0):.2f} ms at B=1"
                if "ms_b1" in v
                else ""
            )
            print(f"  {a.file:<45} {a.bytes / 2**20:8.1f} MiB  {detail}")
        for c in result.checks:
            for f in c.failures:
                print(f"  FAIL {c.name}: {f}")
        for e in result.errors:
            print(f"  ERROR {e}")
        print(f"  report: {result.out / 'validation.md'}")
    if result.passed or args.allow_mismatch:
        return 0
    return 1
