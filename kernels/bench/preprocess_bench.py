"""`egovlp-deploy bench preprocess`: the C++ clip preprocessing against the torch reference, decode alongside.

For each input resolution and frame count: ms per clip of `transforms.eval_transform` (the reference) and of
`preprocess.preprocess_clip` (float32 and float16 output) at the SAME thread count (torch.set_num_threads for the
reference, num_threads for C++), median of --repeats timed runs after --warmup untimed ones; the speedup; the C++
output bandwidth (bytes of the float32 output written per second). Decode: the same number of uniformly spaced
frames read from a generated 64-frame H.264 clip of that resolution with decord and with PyAV, on an already
opened reader (the state the data readers' reader cache keeps during training and evaluation).
Writes preprocess.json (rows + machine, git sha, threads, load average), preprocess.md and preprocess.png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from egovlp_deploy.arg_types import non_negative_int, positive_int
from egovlp_deploy.benchmarking import ResultsFolder, git_sha, machine, median_ms, parse_name_list, times_ms
from egovlp_deploy.errors import error_line

DESCRIPTION = __doc__
INPUTS = {"256p": (256, 455), "480p": (480, 854), "720p": (720, 1280), "1080p": (1080, 1920)}
QUICK_INPUT = ("48p", (48, 64))
DECODE_CLIP_FRAMES = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument(
        "--inputs",
        default="256p,720p,1080p",
        help=f"comma-separated input resolutions from {', '.join(INPUTS)} (default: 256p,720p,1080p)",
    )
    # dest differs from the flag: cli.main validates a scalar `args.frames` (the model's frame count) for every command
    g.add_argument(
        "--frames",
        dest="frame_counts",
        type=positive_int,
        nargs="+",
        default=[4, 16],
        metavar="T",
        help="frames per clip (default: 4 16)",
    )
    g.add_argument("--size", type=positive_int, default=224, help="output side S (default: 224)")
    g.add_argument(
        "--variant",
        choices=("egoclip", "epic"),
        default="egoclip",
        help="eval transform: egoclip (256 -> crop 256 -> 224) or epic (224 -> crop 224) (default: egoclip)",
    )
    t = parser.add_argument_group("timing")
    t.add_argument(
        "--threads", type=positive_int, default=None, help="threads for both paths (default: torch's current count)"
    )
    t.add_argument("--repeats", type=positive_int, default=7, help="timed runs per measurement; the median is reported")
    t.add_argument("--warmup", type=non_negative_int, default=2, help="untimed runs first")
    t.add_argument("--no-decode", action="store_true", help="skip the decord/PyAV decode timings")
    t.add_argument(
        "--quick",
        action="store_true",
        help="a seconds-long smoke run (48x64 input, 2 frames, S=32, 2 repeats) for tests",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench_results/preprocess"),
        metavar="DIR",
        help="where preprocess.json/.md/.png go (default: bench_results/preprocess)",
    )


def _machine() -> dict:
    from egovlp_deploy import preprocess

    native = dict(preprocess._C.build_info()) if preprocess.available() else None
    return {
        **machine(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "extension": native,
    }


def _write_clip(path: Path, height: int, width: int, frames: int) -> None:
    """A smooth moving pattern (like camera footage, unlike noise, which H.264 cannot compress) as H.264 yuv420p.

    yuv420p needs even sides: an odd one (455 of 256p) is rounded up (456)."""
    import av

    height, width = height + height % 2, width + width % 2
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for i in range(frames):
            img = np.stack([(xx + 4 * i) % 256, (yy + 2 * i) % 256, (xx + yy) / 2 % 256], axis=-1).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _decode_ms(path: Path, num_frames: int, repeats: int, warmup: int) -> dict:
    from egovlp_deploy import decoding as video

    step = DECODE_CLIP_FRAMES / num_frames
    indices = [int(step * i + step / 2) for i in range(num_frames)]  # segment middles, the eval sampling
    result = {}
    for backend in ("decord", "pyav"):
        try:
            video.video_info(path, backend)  # open once: the reader cache keeps it
            result[backend] = median_ms(lambda: video.read_frames(path, indices, backend), repeats, warmup)
        except Exception as exc:  # a decoder failing is a result (decord has no aarch64 wheel), not the run's end
            result[backend] = None
            result[f"{backend}_error"] = error_line(exc)
    return result


def _plot(report: dict, path: Path | BinaryIO) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = [f"{r['input']}\nT={r['frames']}" for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(rows), 4.5), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    series = [("torch reference", "reference_ms"), ("C++ fp32", "cpp_fp32_ms"), ("C++ fp16", "cpp_fp16_ms")]
    width = 0.27
    for k, (name, key) in enumerate(series):
        ax.bar(x + (k - 1) * width, [r[key] for r in rows], width, label=name)
    for i, r in enumerate(rows):
        ax.annotate(f"{r['speedup']:.1f}x", (x[i], r["reference_ms"]), ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("ms per clip (median)")
    ax.set_title(f"eval transform -> {report['config']['size']}, {report['threads']} thread(s)")
    ax.legend(fontsize=8)
    ax = axes[1]
    decoded = [r for r in rows if r.get("decode")]
    if decoded:
        xd = np.arange(len(decoded))
        for k, backend in enumerate(("decord", "pyav")):
            ax.bar(xd + (k - 0.5) * 0.4, [r["decode"].get(backend) or 0 for r in decoded], 0.4, label=backend)
        ax.set_xticks(xd, [f"{r['input']}\nT={r['frames']}" for r in decoded], fontsize=8)
        ax.set_ylabel("ms per clip (median)")
        ax.set_title(f"decode T of {DECODE_CLIP_FRAMES} frames (open reader)")
        ax.legend(fontsize=8)
    else:
        ax.set_axis_off()
    fig.suptitle(f"{report['machine']['cpu']} ({report['machine']['logical_cpus']} CPUs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Preprocessing, eval transform '{report['config']['variant']}' -> {report['config']['size']}x"
        f"{report['config']['size']}, {report['threads']} thread(s) for both paths; {m['cpu']} "
        f"({m['logical_cpus']} logical CPUs), torch {m['torch']}; git {report['git_sha']}; load average "
        f"{report['load_average_before'][0]:.2f} before / {report['load_average_after'][0]:.2f} after.",
        "",
        "| input | frames | torch ref (ms) | C++ fp32 (ms) | C++ fp16 (ms) | speedup fp32 | C++ fp32 out GB/s "
        "| decode decord (ms) | decode PyAV (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(v):
        return "-" if v is None else f"{v:.2f}"

    for r in report["rows"]:
        d = r.get("decode") or {}
        lines.append(
            f"| {r['input']} ({r['height']}x{r['width']}) | {r['frames']} | {r['reference_ms']:.2f} | "
            f"{r['cpp_fp32_ms']:.2f} | {r['cpp_fp16_ms']:.2f} | {r['speedup']:.1f}x | "
            f"{r['cpp_fp32_out_gbps']:.2f} | {fmt(d.get('decord'))} | {fmt(d.get('pyav'))} |"
        )
    return "\n".join(lines) + "\n"


def run(args) -> int:
    from egovlp_deploy import preprocess

    if not preprocess.available():
        raise ValueError("the C++ extension egovlp_deploy._C is not built: reinstall the package (pip install .)")
    if args.quick:
        inputs, frame_counts, size, repeats, warmup = [QUICK_INPUT], [2], 32, 2, 1
    else:
        names = parse_name_list(args.inputs, "--inputs", list(INPUTS))
        if len(set(args.frame_counts)) < len(args.frame_counts):
            raise ValueError(f"--frames: a frame count is given twice ({' '.join(map(str, args.frame_counts))})")
        inputs, frame_counts, size = [(n, INPUTS[n]) for n in names], args.frame_counts, args.size
        repeats, warmup = args.repeats, args.warmup
    threads = args.threads or torch.get_num_threads()
    results = ResultsFolder(args.out, "preprocess", ("preprocess.json", "preprocess.md", "preprocess.png"))
    with results:
        return _run(args, results, inputs, frame_counts, size, repeats, warmup, threads)


def _run(args, results, inputs, frame_counts, size, repeats, warmup, threads) -> int:
    from egovlp_deploy import preprocess
    from egovlp_deploy.transforms import eval_transform

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="egovlp-bench-") as tmp:
            for name, (height, width) in inputs:
                clip_path = None
                if not args.no_decode:
                    clip_path = Path(tmp) / f"{name}.mp4"
                    _write_clip(clip_path, height, width, DECODE_CLIP_FRAMES)
                for t in frame_counts:
                    g = torch.Generator().manual_seed(t * 10000 + height)
                    frames = torch.randint(0, 256, (t, height, width, 3), dtype=torch.uint8, generator=g)
                    ref = times_ms(lambda: eval_transform(frames, size, args.variant), repeats, warmup)
                    fp32 = times_ms(
                        lambda: preprocess.preprocess_clip(frames, size, args.variant, num_threads=threads),
                        repeats,
                        warmup,
                    )
                    fp16 = times_ms(
                        lambda: preprocess.preprocess_clip(
                            frames, size, args.variant, dtype=torch.float16, num_threads=threads
                        ),
                        repeats,
                        warmup,
                    )
                    ref_ms, fp32_ms, fp16_ms = (statistics.median(x) for x in (ref, fp32, fp16))
                    out_bytes = t * 3 * size * size * 4
                    # medians are the reported numbers; the minima are kept too, as the machine may be shared
                    row = {
                        "input": name,
                        "height": height,
                        "width": width,
                        "frames": t,
                        "reference_ms": ref_ms,
                        "cpp_fp32_ms": fp32_ms,
                        "cpp_fp16_ms": fp16_ms,
                        "reference_min_ms": min(ref),
                        "cpp_fp32_min_ms": min(fp32),
                        "cpp_fp16_min_ms": min(fp16),
                        "speedup": ref_ms / fp32_ms,
                        "cpp_fp32_out_gbps": out_bytes / (fp32_ms * 1e-3) / 1e9,
                    }
                    if clip_path is not None:
                        row["decode"] = _decode_ms(clip_path, t, repeats, warmup)
                    rows.append(row)
                    print(
                        f"{name:>6} T={t:<3} ref {ref_ms:8.2f} ms  C++ fp32 {fp32_ms:7.2f} ms  fp16 {fp16_ms:7.2f} ms"
                        f"  {row['speedup']:5.1f}x  {row['cpp_fp32_out_gbps']:.2f} GB/s"
                        + (
                            f"  decode decord {row['decode'].get('decord') or float('nan'):.1f} ms"
                            f" PyAV {row['decode'].get('pyav') or float('nan'):.1f} ms"
                            if "decode" in row
                            else ""
                        ),
                        flush=True,
                    )
    finally:
        torch.set_num_threads(previous_threads)

    report = {
        "benchmark": "preprocess",
        "git_sha": git_sha(short=False),
        "threads": threads,
        "machine": _machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "config": {
            "size": size,
            "variant": args.variant,
            "repeats": repeats,
            "warmup": warmup,
            "quick": bool(args.quick),
            "statistic": "median ms per clip",
        },
        "rows": rows,
    }
    results.write(report, _markdown(report), lambda path: _plot(report, path))
    print(f"wrote {args.out / 'preprocess.json'}, preprocess.md, preprocess.png")
    return 0
