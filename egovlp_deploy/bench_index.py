"""`egovlp-deploy bench index`: how fast `egovlp-deploy index` goes through a real-looking video, next to how fast
the decoder alone goes through the same file, in the same run.

The file: a generated 1280x720 30 fps H.264 mp4 with B-frames (x264 'veryfast', 3 B-frames, a key frame every 2 s,
a moving textured pattern at a camera-like bitrate), --seconds long, written once into OUT and reused; or --video.
Rows, each timed once (a whole file is long enough to be its own average):
  * decode only: a PyAV loop over every frame with the codec's frame threading on --threads threads, no colour
    conversion (the decoder's own speed: the ceiling for indexing), and `ffmpeg -threads N -f null` where the
    ffmpeg command is installed (a cross-check);
  * index: the `egovlp-deploy index` command in a fresh process, into a fresh folder, with each --decoders choice:
    wall time, windows, real-time factor, peak RSS of that process, and its ratio to the decode-only speed.
Engines: --engines, or `random:tiny` exported once into OUT (the encoder's cost is not what this measures).
Writes index.json (rows + machine, git sha, load average), index.md and index.png into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

import numpy as np

from egovlp_deploy.arg_types import positive_int
from egovlp_deploy.benchmarking import ResultsFolder, git_sha, machine, parse_name_list
from egovlp_deploy.errors import error_line
from egovlp_deploy.runtime.commands import seconds

DESCRIPTION = __doc__
WIDTH, HEIGHT, FPS = 1280, 720, 30
DECODERS = ("auto", "decord", "pyav")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument("--video", type=Path, help="a video file to index (default: a generated 720p H.264 file)")
    g.add_argument("--seconds", type=positive_int, default=120, help="length of the generated file (default: 120 s)")
    g.add_argument("--engines", type=Path, help="an engines folder (default: random:tiny exported into OUT)")
    g.add_argument(
        "--decoders", default="auto,decord", help="index rows, comma-separated decoder choices (default: auto,decord)"
    )
    g.add_argument(
        "--threads", type=positive_int, default=2, help="decoder threads of the decode-only row (default: 2)"
    )
    g.add_argument("--window", type=seconds, default=2.0, help="index window, seconds (default: 2.0)")
    g.add_argument("--stride", type=seconds, default=1.0, help="index stride, seconds (default: 1.0)")
    g.add_argument("--quick", action="store_true", help="a seconds-long smoke run (a 4 s 160x96 file) for tests")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench_results/index"),
        metavar="DIR",
        help="where index.json/.md/.png go (default: bench_results/index)",
    )


def write_bench_video(path: Path, seconds: int, width: int = WIDTH, height: int = HEIGHT) -> Path:
    """The generated input: a moving textured pattern (compresses like camera footage, not like noise)."""
    from egovlp_deploy.checkpoint import creation_mode

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial.mp4")
    os.close(fd)
    try:
        _encode(tmp, seconds, width, height)
        os.chmod(tmp, creation_mode(0o666))  # mkstemp's 0o600 would make the input private to its writer
        os.replace(tmp, path)
    except BaseException:  # an interrupted or failed encode leaves no file behind, nothing taken for the input
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _encode(tmp: str, seconds: int, width: int, height: int) -> None:
    import av

    yy, xx = np.mgrid[0:height, 0:width]
    base = ((xx[..., None] * np.array([1, 0, 2]) + yy[..., None] * np.array([0, 1, 1])) % 256).astype(np.uint8)
    grain = np.random.default_rng(0).integers(0, 4, (height, width, 3), dtype=np.uint8)
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "bf": "3", "g": str(2 * FPS), "crf": "23"}
        for i in range(seconds * FPS):
            img = np.roll(base, (2 * i, 3 * i), axis=(0, 1)) + np.roll(grain, 7 * i, axis=1)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())


def decode_only(path: Path, threads: int) -> dict:
    """Every frame decoded by PyAV with frame threading, nothing converted: seconds and frames."""
    import av

    start = time.perf_counter()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        frames = sum(1 for _ in container.decode(stream))
    return {"seconds": time.perf_counter() - start, "frames": frames}


def ffmpeg_decode(path: Path, threads: int) -> dict | None:
    """`ffmpeg -threads N -i FILE -f null -` where the command exists (None otherwise); a failing ffmpeg is a
    RuntimeError with its last words."""
    exe = shutil.which("ffmpeg")
    if exe is None:
        return None
    start = time.perf_counter()
    proc = subprocess.run(
        [exe, "-v", "error", "-threads", str(threads), "-i", str(path), "-map", "0:v:0", "-f", "null", "-"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg exited with {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return {"seconds": time.perf_counter() - start}


def index_run(path: Path, engines: Path, decoder: str, window: float, stride: float) -> dict:
    """`egovlp-deploy index` in a fresh process: wall seconds, its summary, and the process's peak RSS."""
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "egovlp_deploy.cli",
            "index",
            str(path),
            "--engines",
            str(engines),
            "--out",
            str(Path(tmp) / "index"),
            "--window",
            str(window),
            "--stride",
            str(stride),
            "--decoder",
            decoder,
            "--quiet",
            "--json",
        ]
        # the child's output goes to files, not pipes: wait4 waits for the child before anything is read, and a
        # child that filled a pipe (64 KiB of warnings) would block on it forever
        with open(Path(tmp) / "stdout", "w+") as stdout, open(Path(tmp) / "stderr", "w+") as stderr:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True)
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except BaseException:  # interrupted: the child does not go on indexing alone
                proc.kill()
                proc.wait()
                raise
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
            seconds = time.perf_counter() - start
            stdout.seek(0)
            stderr.seek(0)
            out, err = stdout.read(), stderr.read()
        if proc.returncode != 0:
            raise RuntimeError(f"index with --decoder {decoder} failed:\n{err[-2000:]}")
        summary = json.loads(out)
        return {
            "seconds": seconds,
            "windows": summary.get("new_windows"),
            "peak_rss_mib": usage.ru_maxrss / 1024,
            "ms_per_clip": summary.get("ms_per_clip"),
        }


def _engines(out: Path) -> Path:
    from egovlp_deploy.bench_e2e import _engines as export_random

    return export_random(out, "tiny", 4, 8)


def run(args) -> int:
    decoders = parse_name_list(args.decoders, "--decoders", DECODERS)
    if args.video is not None and not args.video.is_file():
        raise ValueError(f"--video {args.video}: no such file")
    if args.engines is not None and not (args.engines / "manifest.json").is_file():
        raise ValueError(f"--engines {args.engines}: not an export folder (no manifest.json)")
    with ResultsFolder(args.out, "index", ("index.json", "index.md", "index.png")) as results:
        return _run(args, results, decoders)


def _run(args, results: ResultsFolder, decoders: list[str]) -> int:
    out = results.folder
    seconds = 4 if args.quick else args.seconds
    if args.video:
        video = args.video
    else:
        size = (160, 96) if args.quick else (WIDTH, HEIGHT)
        video = out / f"h264_{size[1]}p_{seconds}s.mp4"
        if not video.is_file():
            print(f"writing {video} ({seconds} s, {size[0]}x{size[1]}, H.264 with B-frames) ...", file=sys.stderr)
            write_bench_video(video, seconds, *size)
    engines = args.engines or _engines(out)
    from egovlp_deploy.decoding import video_timeline

    timeline = video_timeline(video, "pyav")
    duration = timeline.duration
    rows = []
    decoded = decode_only(video, args.threads)
    base_rt = duration / decoded["seconds"]
    rows.append(
        {
            "what": f"decode only (PyAV, {args.threads} threads)",
            "seconds": decoded["seconds"],
            "realtime": base_rt,
            "vs_decode": 1.0,
        }
    )
    ff_what = f"decode only (ffmpeg -threads {args.threads} -f null)"
    try:
        ff = ffmpeg_decode(video, args.threads)
    except (OSError, RuntimeError) as exc:
        ff = None
        rows.append({"what": ff_what, "error": error_line(exc)})
    if ff:
        rows.append(
            {
                "what": ff_what,
                "seconds": ff["seconds"],
                "realtime": duration / ff["seconds"],
                "vs_decode": decoded["seconds"] / ff["seconds"],
            }
        )
    for decoder in decoders:
        try:
            r = index_run(video, engines, decoder, args.window, args.stride)
        except (RuntimeError, ValueError) as exc:
            rows.append({"what": f"index --decoder {decoder}", "error": error_line(exc)})
            continue
        rows.append(
            {
                "what": f"index --decoder {decoder}",
                "seconds": r["seconds"],
                "realtime": duration / r["seconds"],
                "vs_decode": decoded["seconds"] / r["seconds"],
                "windows": r["windows"],
                "peak_rss_mib": r["peak_rss_mib"],
                "ms_per_clip": r["ms_per_clip"],
            }
        )
    report = {
        "benchmark": "index",
        "device": "CPU (decoding and the exported engines' default backend)",
        "git": git_sha(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": _machine(),
        "load_average": os.getloadavg(),
        "video": {
            "path": str(video),
            "seconds": round(duration, 2),
            "frames": timeline.num_frames,
            "fps": timeline.fps,
            "bytes": video.stat().st_size,
        },
        "engines": str(engines),
        "window_sec": args.window,
        "stride_sec": args.stride,
        "rows": rows,
    }
    results.write(report, format_markdown(report), lambda path: _plot(report, path))
    print(format_markdown(report))
    print(f"wrote {out / 'index.json'}, index.md, index.png", file=sys.stderr)
    return 0


def _machine() -> dict:
    import av

    return {
        **machine(),
        "pyav": av.__version__,
        "libavcodec": ".".join(map(str, av.library_versions.get("libavcodec", ()))),
    }


def format_markdown(report: dict) -> str:
    v = report["video"]
    lines = [
        f"# bench index — {report['machine']['cpu']} ({report['machine']['logical_cpus']} CPUs), "
        f"git {report['git']}, {report['date']}",
        "",
        f"Video: {Path(v['path']).name}, {v['seconds']} s, {v['frames']} frames at {v['fps']:g} fps, "
        f"{v['bytes'] / 2**20:.1f} MiB; windows {report['window_sec']} s, stride {report['stride_sec']} s; "
        f"load average at the end {', '.join(f'{x:.2f}' for x in report['load_average'])}.",
        "",
        "| what | seconds | × real time | vs decode only (× its speed) | windows | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        if "error" in r:
            error = r["error"].replace("|", "\\|")
            lines.append(f"| {r['what']} | failed: {error} | | | | |")
            continue
        rss = r.get("peak_rss_mib")
        lines.append(
            f"| {r['what']} | {r['seconds']:.3f} | {r['realtime']:.1f} | {r['vs_decode']:.3g} | "
            f"{r.get('windows', '')} | {'' if rss is None else f'{rss:.1f}'} |"
        )
    return "\n".join(lines) + "\n"


def _plot(report: dict, path: Path | BinaryIO) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "error" not in r]
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.5 * len(rows)))
    ax.barh([r["what"] for r in rows][::-1], [r["realtime"] for r in rows][::-1], color="tab:blue")
    ax.set_xlabel("× real time (higher is faster)")
    ax.set_title(f"indexing vs decoding, {report['video']['seconds']} s 720p H.264", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
