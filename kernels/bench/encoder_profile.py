"""`egovlp-deploy bench profile`: where the dual video encoder's time goes, from `torch.profiler`.

The base video tower (ViT-B/16, 12 divided space-time blocks) at batch 1, 16 frames, fp16, with the chosen
attention path, is run `--iters` times after a warm-up (autotuning, allocator). Reported: wall time per call (host
clock around a synchronised call) against GPU-busy time per call (the sum of the kernels' durations: one stream,
so kernels never overlap), the number of kernel launches per call, the shares of GEMM / attention / normalisation /
elementwise / other kernels, and the top kernels by GPU time. Wall much above GPU-busy means the host (Python, op
dispatch, launchers) decides the latency, which CUDA graphs remove; a large non-GEMM share means fusion has work
left. On a CPU-only machine the same report is made from the CPU operators (self CPU time; no GPU-busy column),
which checks the plumbing, not the GPU.
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path
from typing import BinaryIO

from egovlp_deploy.arg_types import positive_int
from egovlp_deploy.benchmarking import ResultsFolder, machine, times_ms
from egovlp_deploy.benchmarking import git_sha as _git_sha

DESCRIPTION = __doc__

# Kernel or operator name -> category, first match wins (case-insensitive). GEMMs: cuBLAS/CUTLASS kernel names and
# the aten matmul ops; attention: our Triton kernels, SDPA's and the softmax of the reference path.
CATEGORIES = [
    ("attention", r"divided_attention|cross_attention|combine_splits|flash|fmha|attention|softmax|sdpa"),
    ("GEMM", r"gemm|cutlass|xmma|cublas|matmul|addmm|\bmm\b|aten::mm|aten::bmm|aten::linear|conv"),
    ("normalisation", r"layer_norm|layernorm|norm"),
    (
        "elementwise",
        r"elementwise|vectorized|reduce|add|mul|gelu|copy|cat|index|fill|clone|contiguous|transpose|"
        r"view|reshape|permute|expand|to_copy|neg|div|sub|exp",
    ),
]


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--out",
        default="bench_results/profile",
        metavar="DIR",
        help="output folder for profile.json, profile.md, profile.png (default: %(default)s)",
    )
    parser.add_argument("--model", choices=("base", "tiny"), default="base", help="tower size (default: base)")
    parser.add_argument("--frames", type=positive_int, default=16, help="frames per clip (default: 16)")
    parser.add_argument("--batch", type=positive_int, default=1, help="clips per call (default: 1)")
    parser.add_argument(
        "--dtype",
        choices=("fp16", "bf16", "fp32"),
        default="fp16",
        help="GPU dtype (default: fp16; the CPU always runs fp32)",
    )
    parser.add_argument(
        "--attention",
        default=None,
        help="attention backend (default: triton on CUDA; the CPU always runs the reference math)",
    )
    parser.add_argument("--iters", type=positive_int, default=20, help="profiled calls (default: 20)")
    parser.add_argument("--top", type=positive_int, default=15, help="kernels listed (default: 15)")


def profile_tower(tower, video, iters: int, device: str) -> dict:
    """Wall and busy time per call, launches per call, time per category and per kernel (ms per call)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"

    def call():
        with torch.inference_mode():
            tower(video)
        if cuda:
            torch.cuda.synchronize()

    walls = times_ms(call, iters, warmup=3)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            call()
    per_kernel: dict[str, float] = {}
    launches = 0
    for event in prof.events():
        if cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = event.device_time
        else:
            if event.device_type != torch.autograd.DeviceType.CPU or event.name.startswith("ProfilerStep"):
                continue
            us = event.self_cpu_time_total
        per_kernel[event.name] = per_kernel.get(event.name, 0.0) + us / 1e3 / iters
        launches += 1
    busy = sum(per_kernel.values())
    shares: dict[str, float] = {}
    for name, ms in per_kernel.items():
        shares[category(name)] = shares.get(category(name), 0.0) + ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])
    return {
        "wall_ms": statistics.median(walls),
        "wall_ms_min": min(walls),
        "busy_ms": busy if cuda else None,
        "self_cpu_ms": None if cuda else busy,
        "launches_per_call": launches / iters,
        "categories": {
            k: {"ms": v, "share": v / busy if busy else None} for k, v in sorted(shares.items(), key=lambda kv: -kv[1])
        },
        "kernels": [
            {"name": n, "ms": ms, "share": ms / busy if busy else None, "category": category(n)} for n, ms in top
        ],
    }


def _markdown(result: dict, top: int) -> str:
    m, p = result["meta"], result["profile"]
    unit = "GPU" if p["busy_ms"] is not None else "self CPU"
    total = p["busy_ms"] if p["busy_ms"] is not None else p["self_cpu_ms"]
    lines = [
        f"Dual video encoder profile: {m['model']} tower, B={m['batch']}, F={m['frames']}, {m['dtype']}, "
        f"{m['attention']} attention; device {m['device']}; torch {m['torch']}; git {m['git_sha']}; "
        f"{m['iters']} profiled calls",
        "",
        *([m["note"], ""] if m.get("note") else []),
        f"| wall ms / call | {unit} ms / call | busy / wall | "
        + ("kernel launches" if p["busy_ms"] is not None else "operators")
        + " / call |",
        "|---:|---:|---:|---:|",
        f"| {p['wall_ms']:.3f} | {total:.3f} | "
        + (f"{p['busy_ms'] / p['wall_ms']:.0%}" if p["busy_ms"] is not None else "-")
        + f" | {p['launches_per_call']:.0f} |",
        "",
        f"| category | {unit} ms / call | share |",
        "|---|---:|---:|",
    ]
    lines += [f"| {k} | {v['ms']:.3f} | {v['share']:.0%} |" for k, v in p["categories"].items()]
    lines += ["", f"| kernel (top {top}) | category | {unit} ms / call | share |", "|---|---|---:|---:|"]
    lines += [
        f"| `{k['name'][:90]}` | {k['category']} | {k['ms']:.4f} | {k['share']:.1%} |" for k in p["kernels"][:top]
    ]
    return "\n".join(lines) + "\n"


def _plot(result: dict, path: Path | BinaryIO) -> None:
    """Time per call by category, with the wall time for comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, m = result["profile"], result["meta"]
    labels = list(p["categories"]) + ["wall (host clock)"]
    values = [v["ms"] for v in p["categories"].values()] + [p["wall_ms"]]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(labels) + 1.5))
    ax.barh(labels[::-1], values[::-1], color=["gray"] + ["tab:blue"] * (len(labels) - 1))
    unit = "GPU" if p["busy_ms"] is not None else "self CPU"
    ax.set_xlabel(f"ms per call ({unit} time by category; wall time last)")
    ax.set_title(
        f"{m['model']} video encoder, B={m['batch']} F={m['frames']} {m['dtype']}, {m['attention']} "
        f"attention, {m['device']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    import torch

    from egovlp_deploy.config import check_attention_backend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    attention = args.attention or "triton"
    check_attention_backend(attention)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if device == "cpu":
        if args.attention not in (None, "reference"):
            note = f"bench profile: no CUDA device: --attention {args.attention} is profiled as reference"
            print(note, file=sys.stderr)
        dtype, attention = torch.float32, "reference"  # the kernels would run in the interpreter: not a profile
    with ResultsFolder(args.out, "profile", ("profile.json", "profile.md", "profile.png")) as results:
        return _run(args, results, device, dtype, attention)


def _run(args, results: ResultsFolder, device, dtype, attention) -> int:
    import os

    import torch

    from egovlp_deploy.config import EgoVLPv2Config
    from egovlp_deploy.model.video_tower import SpaceTimeTransformer

    config = (
        EgoVLPv2Config.tiny(num_frames=args.frames)
        if args.model == "tiny"
        else EgoVLPv2Config.base(num_frames=args.frames)
    )
    v = config.video
    tower = SpaceTimeTransformer(v, config.num_fuse_blocks, v.width).to(device, dtype).eval()
    for m in tower.modules():
        if hasattr(m, "attention_backend"):
            m.attention_backend = attention
    video = torch.randn(args.batch, v.num_frames, 3, v.img_size, v.img_size, device=device, dtype=dtype)
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (no CUDA device)"
    result = {
        "meta": {
            "model": args.model,
            "batch": args.batch,
            "frames": args.frames,
            "dtype": str(dtype).replace("torch.", ""),
            "attention": attention,
            "device": device_name,
            "torch": torch.__version__,
            "git_sha": _git_sha(),
            "iters": args.iters,
            "note": ""
            if device == "cuda"
            else "CPU run: self CPU time of the operators under the profiler, which slows them; it checks the "
            "plumbing, not the GPU",
            "machine": machine(),
            "cpu_count": os.cpu_count(),
        },
        "profile": profile_tower(tower, video, args.iters, device),
    }
    results.write(result, _markdown(result, args.top), lambda path: _plot(result, path))
    print(_markdown(result, args.top))
    return 0
