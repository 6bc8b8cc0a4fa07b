"""`egovlp-deploy bench export`: every exported role at batch 1 on this machine's CPU, in one run:
PyTorch eager (reference attention, the export's source) vs ONNX Runtime CPU fp32 and int8 (dynamic quantization).

Protocol (BENCHMARKS.md, "Export (ONNX Runtime CPU)"): random weights of the chosen config (or --checkpoint), one
export per role (fp32 ONNX, int8 derived from it), inputs random (never zeros), text length 15 (the pre-training
length). Each backend: one warm-up call, then the median of `--repeats` wall-clock calls. Torch and ORT use the
same thread count (`--threads`, default torch's). Ratios are eager ms / ORT ms from the same run, so machine load
shifts both. Each ORT output is compared to eager (max rel err) so a fast wrong graph cannot pass unnoticed.
Outputs: export.json (rows + machine, versions, git sha), export.md (the table), export.png (speedups).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from egovlp_deploy.arg_types import non_negative_int, positive_int
from egovlp_deploy.benchmarking import ResultsFolder, machine, parse_name_list
from egovlp_deploy.benchmarking import git_sha as _git_sha
from egovlp_deploy.benchmarking import median_ms as _median_ms
from egovlp_deploy.ort_session import ort_session

DESCRIPTION = __doc__
TARGET_VIDEO_SPEEDUP = 1.3  # the export's speed target: ORT fp32 >= 1.3x PyTorch eager for the video encoder


@dataclass
class Row:
    config: str
    role: str
    backend: str  # torch-eager | ort-fp32 | ort-int8
    ms: float
    speedup: float | None = None  # torch-eager ms / this ms
    max_rel_err: float | None = None  # vs torch eager on the same inputs


def add_arguments(parser) -> None:
    parser.add_argument(
        "--out",
        default="bench_results/export",
        metavar="DIR",
        help="folder for export.json, export.md, export.png (default: %(default)s)",
    )
    parser.add_argument("--configs", default="tiny", help="comma list of tiny, base (random weights; default: tiny)")
    parser.add_argument("--checkpoint", metavar="CKPT", help="benchmark this checkpoint instead of --configs")
    parser.add_argument("--frames", type=int, default=4, metavar="F", help="frames per clip (default: 4)")
    parser.add_argument(
        "--roles",
        default="video_encoder,text_encoder,video_fusion_prefix,fusion_head,fusion",
        help="comma list of roles (default: all)",
    )
    parser.add_argument("--repeats", type=positive_int, default=10, help="timed calls per backend (default: 10)")
    parser.add_argument(
        "--threads", type=non_negative_int, default=0, help="threads for torch and ORT (default, 0: torch's)"
    )
    parser.add_argument("--text-len", type=positive_int, default=15, help="text length (default: 15)")


def bench_config(
    name: str, checkpoint: str, frames: int, roles: list[str], repeats: int, threads: int, text_len: int, work: Path
) -> list[Row]:
    import numpy as np
    import torch

    from egovlp_deploy.model.factory import load_model

    from .onnx_export import export_onnx
    from .precision import to_int8
    from .specs import example_inputs, export_patches, role_module
    from .validate import compare, torch_outputs

    model, _ = load_model(checkpoint, frames)
    rows = []
    for role in roles:
        path = work / name / f"{role}.onnx"
        export_onnx(model, role, path, max_batch=4, max_text_len=max(text_len, 16))
        to_int8(path, path.with_name(f"{role}.int8.onnx"))
        inputs = example_inputs(model, role, 1, text_len, seed=5)
        np_inputs = {k: v.numpy() for k, v in inputs.items()}
        ref = torch_outputs(model, role, inputs)
        module = role_module(model, role)
        with torch.no_grad(), export_patches(model):  # the same graph eager runs: reference attention
            eager = _median_ms(lambda: module(**inputs), repeats)
        rows.append(Row(name, role, "torch-eager", eager, 1.0, 0.0))
        for backend, file in (("ort-fp32", path), ("ort-int8", path.with_name(f"{role}.int8.onnx"))):
            session = ort_session(file, threads=threads)
            out = session.run(None, np_inputs)
            err = max(compare(ref[n], np.asarray(o)).max_rel for n, o in zip(ref, out))
            ms = _median_ms(lambda: session.run(None, np_inputs), repeats)
            rows.append(Row(name, role, backend, ms, eager / ms, err))
        print(
            f"{name:<5} {role:<20} eager {eager:8.2f} ms | "
            + " | ".join(f"{r.backend} {r.ms:8.2f} ms x{r.speedup:.2f}" for r in rows[-2:]),
            flush=True,
        )
    return rows


def run(args) -> int:
    import torch

    from .specs import ROLES

    # every argument is checked before anything runs; a role or config given twice would give two rows of one
    # key, of which the table would show one
    roles = parse_name_list(args.roles, "--roles", list(ROLES))
    names = ["checkpoint"] if args.checkpoint else parse_name_list(args.configs, "--configs", ("tiny", "base"))
    configs = [("checkpoint", args.checkpoint)] if args.checkpoint else [(c, f"random:{c}") for c in names]
    threads = args.threads or torch.get_num_threads()
    with ResultsFolder(args.out, "export", ("export.json", "export.md", "export.png")) as results:
        return _run(args, results, roles, configs, threads)


def _run(args, results: ResultsFolder, roles: list[str], configs: list[tuple[str, str]], threads: int) -> int:
    import tempfile

    import torch

    torch.set_num_threads(threads)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="egovlp-bench-export-") as work:
        for name, ckpt in configs:
            rows += bench_config(name, ckpt, args.frames, roles, args.repeats, threads, args.text_len, Path(work))
    meta = {
        "device": "CPU (ONNX Runtime CPUExecutionProvider; torch eager on the CPU)",
        "machine": machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "load_avg": os.getloadavg(),
        "frames": args.frames,
        "text_len": args.text_len,
        "repeats": args.repeats,
        "git_sha": _git_sha(),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
    }
    results.write(
        {"meta": meta, "rows": [asdict(r) for r in rows]}, format_table(rows, meta), lambda path: plot(rows, path)
    )
    print(f"wrote {results.folder / 'export.json'}, export.md, export.png")
    return 0


def format_table(rows: list[Row], meta: dict) -> str:
    lines = [
        f"Batch 1, {meta['frames']} frames, text length {meta['text_len']}, {meta['threads']} threads on "
        f"{meta['machine']['cpu']} ({meta['cpu_count']} logical CPUs), torch {meta['torch']}, onnxruntime "
        f"{meta['onnxruntime']}, median of {meta['repeats']} calls, git {meta['git_sha']}, load average "
        f"{meta['load_avg'][0]:.1f}",
        "",
        "| config | role | torch eager ms | ORT fp32 ms (x eager) | ORT int8 ms (x eager) | max rel err fp32 / int8 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    by = {}
    for r in rows:
        by.setdefault((r.config, r.role), {})[r.backend] = r
    for (config, role), b in by.items():
        e, f, i = b["torch-eager"], b["ort-fp32"], b["ort-int8"]
        lines.append(
            f"| {config} | {role} | {e.ms:.2f} | {f.ms:.2f} ({f.speedup:.2f}x) | {i.ms:.2f} "
            f"({i.speedup:.2f}x) | {f.max_rel_err:.1e} / {i.max_rel_err:.1e} |"
        )
    for (config, role), b in by.items():
        if role == "video_encoder":
            s = b["ort-fp32"].speedup
            lines.append(
                f"\nTarget ORT fp32 >= {TARGET_VIDEO_SPEEDUP}x eager for the video encoder ({config}): "
                f"{s:.2f}x, {'met' if s >= TARGET_VIDEO_SPEEDUP else 'NOT met'}."
            )
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path | BinaryIO) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r.config, r.role) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys)), 4))
    width = 0.38
    for k, backend in enumerate(("ort-fp32", "ort-int8")):
        values = [next(r.speedup for r in rows if (r.config, r.role) == key and r.backend == backend) for key in keys]
        ax.bar([i + (k - 0.5) * width for i in range(len(keys))], values, width, label=backend)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(TARGET_VIDEO_SPEEDUP, color="red", linestyle="--", linewidth=0.8, label="video target 1.3x")
    ax.set_xticks(range(len(keys)), [f"{c}\n{r}" for c, r in keys], fontsize=7)
    ax.set_ylabel("speedup over PyTorch eager (B=1)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
