"""`egovlp-deploy bench e2e`: end-to-end latency of the runtime stages, per backend and precision, at F in {4, 16}.

Stages (batch 1 unless stated): decode+preprocess of one clip from an mp4 (the runtime's ClipPipeline: decord/PyAV +
C++ preprocessing), video encode, text encode (tokenize + text encoder), and fusion re-ranking of k in {5, 20}
clips against one query two ways: `cached` (the fusion head over the clips' cached video prefixes and the query's
text prefix, what `search --rerank` runs) and `monolithic` (the whole fusion graph from the preprocessed clips and
the token ids, the path without a cache). Both return the same scores (checked every run: max |difference|).

Per stage: p50/p90/p99 over --iters timed calls after --warmup untimed ones; cold start = engine load + first
call; peak memory = the process's peak RSS while the stage runs (sampled every 2 ms; on CUDA also
torch.cuda.max_memory_allocated). Engines are exported from seeded random weights (`random:tiny` or
`random:base`) into OUT/engines_<model>_f<F> once and reused. Also the GMAC comparison of EgoVLPv2's fusion in the
backbone against stacking the same cross-attention layers as extra fusion layers on top of complete dual towers.
Writes OUT/e2e.json, OUT/e2e.md and OUT/e2e.png (and `--quick` runs a plumbing check in seconds); while the run
goes on, the rows so far are in e2e.json with "complete": false (and a first line in e2e.md saying so).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .arg_types import non_negative_int, positive_int
from .benchmarking import ResultsFolder, machine, parse_int_list, parse_name_list
from .benchmarking import git_sha as _git_sha
from .errors import error_line

DESCRIPTION = __doc__


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (engines are cached here too)")
    p.add_argument("--model", choices=("tiny", "base"), default="tiny", help="model size (default: tiny)")
    p.add_argument(
        "--frames", dest="frame_list", default="4,16", metavar="LIST", help="frames per clip (default: 4,16)"
    )
    p.add_argument(
        "--backends",
        default="onnxruntime,torch",
        metavar="LIST",
        help="comma list of onnxruntime, torch, program, aoti, tensorrt (default: onnxruntime,torch; program "
        "exports torch.export programs for --device beside the ONNX graphs)",
    )
    p.add_argument(
        "--precisions", default="fp32", metavar="LIST", help="comma list of fp32, fp16, int8 (default: fp32)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument(
        "--torch-attention",
        default="auto",
        metavar="LIST",
        help="comma list of attention paths for the torch backend: auto (Triton kernels on CUDA, "
        "reference math on CPU), reference (plain eager PyTorch), sdpa, triton, tuned (per attention shape the "
        "fastest measured here; the picks are listed with the results); each is its own row, labelled "
        "torch/<path> unless auto (default: auto)",
    )
    p.add_argument(
        "--torch-graphs",
        default=None,
        metavar="LIST",
        help="torch, program and aoti backends: off, on or off,on (CUDA graphs; default: off,on on cuda, off "
        "elsewhere)",
    )
    p.add_argument(
        "--compile",
        default="off",
        metavar="LIST",
        help="torch and program backends: off, on or off,on (Inductor compile at load, its own rows labelled "
        "+compile; default: off)",
    )
    p.add_argument("--ks", default="5,20", metavar="LIST", help="re-ranked clip counts (default: 5,20)")
    p.add_argument("--iters", type=positive_int, default=30, help="timed calls per stage (default: 30)")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed calls first (default: 3)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="intra-op threads (default: runtime default)")
    p.add_argument("--quick", action="store_true", help="F=4, k=5, 3 iterations, onnxruntime only (tests)")
    p.add_argument("--engines", metavar="DIR", help="use this export folder instead of exporting (one F)")


class PeakRSS:
    """Peak resident memory of this process while the block runs (a sampling thread; Linux /proc)."""

    def __init__(self, every_s: float = 0.002):
        self.every, self.peak, self._stop = every_s, 0, threading.Event()

    @staticmethod
    def now() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.every)

    def __enter__(self):
        self.peak = self.now()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def _timed(fn, iters: int, warmup: int) -> dict:
    """p50/p90/p99 (numpy's linear interpolation between the sorted samples) and mean of `iters` timed calls of
    `fn()` after `warmup` untimed ones, and the process's peak RSS during the timed calls."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"a timing needs iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    with PeakRSS() as mem:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    t = np.array(times)
    return {
        "p50": float(np.percentile(t, 50)),
        "p90": float(np.percentile(t, 90)),
        "p99": float(np.percentile(t, 99)),
        "mean": float(t.mean()),
        "iters": iters,
        "peak_rss_mib": round(mem.peak / 2**20, 1),
    }


def write_test_video(path: Path, frames: int = 64, size: tuple[int, int] = (320, 240), fps: int = 30) -> Path:
    """A small mp4 (moving gradient) written with PyAV: the decode stage reads a real H.264 file."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        yy, xx = np.mgrid[0:h, 0:w]
        for i in range(frames):
            img = np.stack([(xx + 4 * i) % 256, (yy + 2 * i) % 256, np.full_like(xx, (8 * i) % 256)], -1)
            for packet in s.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


def _engines(out: Path, model: str, frames: int, max_batch: int, program_device=None, precisions=("fp32",)) -> Path:
    """An export of seeded random weights (ONNX; with `program_device`, torch.export programs for it too), kept in
    `out` and reused by the next run."""
    from egovlp_deploy.export.runner import ExportOptions, run_export

    d = (
        out / f"engines_{model}_f{frames}"
        if program_device is None
        else out / f"engines_{model}_f{frames}_program_{program_device.split(':')[0]}"
    )
    opts = ExportOptions(frames=frames, max_batch=max_batch, task_checks=False, ort_optimize="never")
    # fp32 always (every other row compares with it), int8 (ONNX dynamic quantization) when asked for
    opts.precisions = ("fp32", "int8") if "int8" in precisions else ("fp32",)
    if program_device is not None:
        opts.formats = ("onnx", "program")
        opts.torch_device = program_device
        opts.precisions = tuple(p for p in precisions if p in ("fp32", "fp16")) or ("fp32",)
    if _cached_export_holds(d, opts.precisions):
        return d
    result = run_export(f"random:{model}", d, opts, quiet=True)
    if not result.passed:
        raise ValueError(f"export of random:{model} at F={frames} failed validation: {result.errors}")
    return d


def _cached_export_holds(folder: Path, precisions: tuple[str, ...]) -> bool:
    """Whether the finished export in `folder` (a run before this one) has ONNX artifacts of every precision asked
    for; one without them (an fp32-only export, when int8 is asked now) is exported again."""
    from .jsonfile import read_json

    if not (folder / "manifest.json").is_file():
        return False
    try:
        manifest = read_json(folder / "manifest.json", expect=dict)
        held = {a.get("precision") for a in manifest.get("artifacts", []) if a.get("format") == "onnx"}
    except (ValueError, AttributeError, TypeError):
        return False
    return set(precisions) <= held


def gmac_comparison(model: str = "base", frames=(4, 16), text_length: int = 15) -> list[dict]:
    """Fusion in the backbone (EgoVLPv2: the top layers of the towers carry the cross-attention) vs stacking the
    same cross-attention as extra fusion layers on top of complete dual towers (the usual fusion encoder: all
    unfused layers run, then as many fused layers again). Per video-text pair, batch 1, meta device."""
    import torch

    from egovlp_deploy.compute import _count
    from egovlp_deploy.config import EgoVLPv2Config
    from egovlp_deploy.model import EgoVLPv2

    rows = []
    for f in frames:
        config = getattr(EgoVLPv2Config, model)(num_frames=f)
        with torch.device("meta"):
            m = EgoVLPv2(config).eval()
            v = config.video
            video = torch.zeros(1, f, v.in_chans, v.img_size, v.img_size)
            ids = torch.zeros(1, text_length, dtype=torch.long)
            mask = torch.ones(1, text_length, dtype=torch.long)
        m._check_text = lambda *a: None  # the meta device has no values for the id-range check
        fused, cross = _count(lambda: m.fuse(video, ids, mask))
        dual_v, _ = _count(lambda: m.encode_video(video, project=False))
        dual_t, _ = _count(lambda: m.encode_text(ids, mask, project=False))
        prefix_v, _ = _count(lambda: m.fusion_video_prefix(video))
        prefix_t, _ = _count(lambda: m.text_prefix(ids, mask))
        # Stacked: the complete dual towers, then the fused layers (identical to EgoVLPv2's top layers) on top.
        stacked = fused + (dual_v - prefix_v) + (dual_t - prefix_t)
        rows.append(
            {
                "model": model,
                "frames": f,
                "text_length": text_length,
                "fusion_in_backbone_gmacs": fused,
                "stacked_gmacs": stacked,
                "cross_attention_gmacs": cross,
                "saving_pct": 100 * (1 - fused / stacked),
            }
        )
    return rows


def _check_device(device: str) -> None:
    """`cpu`, or `cuda` / `cuda:N` with that CUDA device present: a CUDA run on a machine without one would time the
    CPU fallbacks and label them cuda."""
    import torch

    if device == "cpu":
        return
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise ValueError(f"--device: {device!r} is not cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device on this machine (torch.cuda.is_available() is False)")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def run(args) -> int:
    from .config import ATTENTION_BACKENDS
    from .runtime.engines import BACKENDS

    # every argument is checked before anything is exported or timed; a value given twice is refused, as its rows
    # would share one key and the cached/monolithic ratios would pair the wrong rows
    frames = [4] if args.quick else parse_int_list(args.frame_list, "--frames")
    ks = [5] if args.quick else parse_int_list(args.ks, "--ks")
    backends = ["onnxruntime"] if args.quick else parse_name_list(args.backends, "--backends", BACKENDS)
    precisions = parse_name_list(args.precisions, "--precisions", ("fp32", "fp16", "int8"))
    attentions = parse_name_list(args.torch_attention, "--torch-attention", ATTENTION_BACKENDS)
    _check_device(args.device)
    graph_modes = parse_name_list(
        args.torch_graphs or ("off,on" if args.device.startswith("cuda") else "off"), "--torch-graphs", ("off", "on")
    )
    compile_modes = parse_name_list(args.compile, "--compile", ("off", "on"))
    iters, warmup = (3, 1) if args.quick else (args.iters, args.warmup)
    with ResultsFolder(args.out, "e2e", ("e2e.json", "e2e.md", "e2e.png")) as results:
        with tempfile.TemporaryDirectory(prefix="egovlp-bench-e2e-") as tmp:
            modes = (frames, ks, backends, precisions, attentions, graph_modes, compile_modes, iters, warmup)
            return _run(args, results, Path(tmp), *modes)


def _run(args, results, tmp, frames, ks, backends, precisions, attentions, graph_modes, compile_modes, iters, warmup):
    import torch

    from .runtime.clip_pipeline import ClipPipeline, plan_windows
    from .runtime.engines import Runtime

    out = results.folder
    if args.threads:
        torch.set_num_threads(args.threads)
    video = write_test_video(tmp / "bench_video.mp4")  # never into OUT, where a file of that name may be the user's
    rows, parity, picks = [], [], []
    result = {"meta": _meta(args, iters, warmup), "rows": rows, "rerank_parity": parity, "speedups": [],
              "attention_picks": picks, "gmacs": gmac_comparison("base", (4, 16))}  # fmt: skip
    failed = 0
    for f in frames:
        engines = (
            Path(args.engines)
            if args.engines
            else _engines(out, args.model, f, max(ks + [8]), args.device if "program" in backends else None, precisions)
        )
        probe = Runtime(engines, warmup=False)
        cfg = probe.folder.config
        if cfg.video.num_frames != f:
            raise ValueError(f"{engines}: exported for {cfg.video.num_frames} frames, asked {f}")
        pipe = ClipPipeline(f, cfg.video.img_size)
        windows, _ = plan_windows(video, f, window_sec=1.0, stride_sec=1.0)
        stat = _timed(lambda: pipe.clips(video, windows[:1]), iters, warmup)
        rows.append(
            {
                "stage": "decode+preprocess",
                "backend": "-",
                "precision": "-",
                "frames": f,
                "k": 1,
                **stat,
                "note": pipe.preprocessing,
            }
        )
        clips = pipe.clips(video, windows[:1])
        runs = [
            (b, a, g == "on", c == "on")
            for b in backends
            for a in (attentions if b == "torch" else ["auto"])
            for c in (compile_modes if b in ("torch", "program") else ["off"])
            for g in (graph_modes if b in ("torch", "program", "aoti") else ["off"])
        ]
        for backend, attention, graphs, compiled in runs:
            for precision in precisions:
                label = _label(backend, attention, graphs, compiled)
                measured = len(rows)
                try:
                    _bench_backend(
                        rows,
                        engines,
                        backend,
                        precision,
                        args.device,
                        args.threads,
                        f,
                        ks,
                        clips,
                        iters,
                        warmup,
                        parity,
                        attention=attention,
                        graphs=graphs,
                        compiled=compiled,
                        picks=picks,
                    )
                except Exception as exc:
                    # A run that never started for want of its artifacts or runtime (no aoti/tensorrt here) is
                    # "unavailable"; anything else, or a run that measured some stages and then broke (an
                    # Inductor or CUDA error, a role that does not load), is "failed": its rows so far stay, the
                    # other runs go on, and the exit status says so.
                    absent = isinstance(exc, (ValueError, OSError, ImportError)) and len(rows) == measured
                    row = {"stage": "unavailable" if absent else "failed", "backend": label, "precision": precision,
                           "frames": f, "note": str(exc)[:300] if absent else error_line(exc, 300)}  # fmt: skip
                    rows.append(row)
                    if not absent:
                        failed += 1
                        print(f"bench e2e: {label} {precision} F={f} failed:", file=sys.stderr)
                        traceback.print_exc(file=sys.stderr)
                _write(results, result, complete=False)  # a run cut short still leaves its rows, marked incomplete
    result["meta"]["load_avg"] = os.getloadavg()
    _write(results, result, complete=True)
    print(format_markdown(result))
    return 1 if failed else 0


def _meta(args, iters: int, warmup: int) -> dict:
    import torch

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:  # a torch-only install: its rows say so
        ort_version = None
    return {
        "machine": machine(),
        "torch": torch.__version__,
        "onnxruntime": ort_version,
        "numpy": np.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
        "model": args.model,
        "load_avg": os.getloadavg(),
        "git_sha": _git_sha(),
        "iters": iters,
        "warmup": warmup,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _write(results: ResultsFolder, result: dict, complete: bool) -> None:
    result["speedups"] = _speedups(result["rows"])
    results.write(result, format_markdown(result), lambda path: plot(result, path), complete=complete)


def _label(backend: str, attention: str, graphs: bool = False, compiled: bool = False) -> str:
    """A row's backend column: torch/<path> when the torch backend runs a non-default attention path, +compile when
    Inductor compiled it at load, +graphs when its calls replay CUDA graphs."""
    return (
        (backend if attention == "auto" else f"{backend}/{attention}")
        + ("+compile" if compiled else "")
        + ("+graphs" if graphs else "")
    )


def _bench_backend(
    rows: list,
    engines,
    backend,
    precision,
    device,
    threads,
    f,
    ks,
    clips,
    iters,
    warmup,
    parity,
    attention: str = "auto",
    graphs: bool = False,
    picks: list | None = None,
    compiled: bool = False,
) -> None:
    """Appends to `rows` the rows of one backend/precision/attention/graphs run, each as soon as it is measured; with
    'tuned' attention, what the plan picked per attention shape (and the times it picked by) goes into `picks`."""
    import torch

    from .runtime.engines import Runtime

    rt = Runtime(
        engines,
        backend=backend,
        precision=precision,
        device=device,
        threads=threads,
        warmup=False,
        attention=attention,
        graphs=graphs,
        compile=compiled,
    )
    query_ids = np.array([[0] + list(range(10, 21)) + [2]], np.int64)  # 13 tokens, a typical narration length
    query_mask = np.ones_like(query_ids)
    tag = {"backend": _label(backend, attention, graphs, compiled), "precision": precision, "frames": f}

    def cold(role, inputs):
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            r = rt.runner(role)
            r(**inputs)
        provider = r.provider + (f" ({r.graphs.status()})" if getattr(r, "graphs", None) else "")
        return {
            "cold_start_ms": (time.perf_counter() - t0) * 1e3,
            "load_peak_rss_mib": round(mem.peak / 2**20, 1),
            "provider": provider,
        }

    info = cold("video_encoder", {"video": clips})
    rows.append(
        {
            "stage": "video encode",
            "k": 1,
            **tag,
            **info,
            **_timed(lambda: rt.runner("video_encoder")(video=clips), iters, warmup),
        }
    )
    info = cold("text_encoder", {"input_ids": query_ids, "attention_mask": query_mask})
    rows.append(
        {
            "stage": "text encode",
            "k": 1,
            **tag,
            **info,
            **_timed(lambda: rt.runner("text_encoder")(input_ids=query_ids, attention_mask=query_mask), iters, warmup),
        }
    )
    text = rt.runner("text_encoder")(input_ids=query_ids, attention_mask=query_mask)
    have_fusion = backend in ("onnxruntime", "torch", "tensorrt")  # AOTInductor has no one-graph fusion role
    for k in ks:
        batch = np.repeat(clips, k, axis=0) + np.random.default_rng(k).normal(0, 0.1, (k, *clips.shape[1:])).astype(
            np.float32
        )
        prefixes = rt.video_encoder.fusion_prefix(batch)  # split by the exported max batch
        info = cold(
            "fusion_head",
            {"video_prefix": prefixes[:1], "text_prefix": text["text_prefix"], "attention_mask": query_mask},
        )
        cached = lambda: rt.fusion.score_prefixes(prefixes, text["text_prefix"], query_mask)  # noqa: E731
        rows.append({"stage": "re-rank cached", "k": k, **tag, **info, **_timed(cached, iters, warmup)})
        if have_fusion:
            info = cold("fusion", {"video": batch[:1], "input_ids": query_ids, "attention_mask": query_mask})
            mono = lambda: rt.fusion.score_clips(batch, query_ids, query_mask)  # noqa: E731
            rows.append({"stage": "re-rank monolithic", "k": k, **tag, **info, **_timed(mono, iters, warmup)})
            parity.append({**tag, "k": k, "max_abs_diff": float(np.abs(cached() - mono()).max())})
    if torch.cuda.is_available() and device.startswith("cuda"):
        rows[-1]["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if rt.attention_plan is not None and picks is not None:
        picks.append({**tag, "summary": rt.attention_plan.summary(), "picks": rt.attention_plan.report()})


def _speedups(rows) -> list[dict]:
    out = []
    for r in rows:
        if r["stage"] != "re-rank cached":
            continue
        mono = [
            m
            for m in rows
            if m["stage"] == "re-rank monolithic"
            and all(m[key] == r[key] for key in ("backend", "precision", "frames", "k"))
        ]
        if mono:
            out.append(
                {key: r[key] for key in ("backend", "precision", "frames", "k")}
                | {"cached_p50": r["p50"], "monolithic_p50": mono[0]["p50"], "speedup": mono[0]["p50"] / r["p50"]}
            )
    return out


def format_markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        f"End-to-end latency ({m['model']} model, device {m['device']}, {m['cpu_count']} CPUs, torch threads "
        f"{m['torch_threads']}, load average {', '.join(f'{x:.1f}' for x in m['load_avg'])}, {m['iters']} "
        f"iterations after {m['warmup']} warm-up, git {m['git_sha']})",
        "",
        "| stage | backend | precision | F | k | p50 ms | p90 ms | p99 ms | cold start ms | peak RSS MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if r["stage"] in ("unavailable", "failed"):
            note = " ".join(r["note"].split())[:80].replace("|", "\\|")  # one table cell: no newline, no bar
            lines.append(f"| {r['stage']} | {r['backend']} | {r['precision']} | {r['frames']} | | | | | | {note} |")
            continue
        cold = f"{r['cold_start_ms']:.0f}" if "cold_start_ms" in r else "-"
        lines.append(
            f"| {r['stage']} | {r['backend']}{' / ' + r['provider'] if r.get('provider') else ''} | "
            f"{r['precision']} | {r['frames']} | {r['k']} | {r['p50']:.2f} | {r['p90']:.2f} | "
            f"{r['p99']:.2f} | {cold} | {r['peak_rss_mib']:.0f} |"
        )
    if result["speedups"]:
        lines += [
            "",
            "| precision | backend | F | k | cached p50 ms | monolithic p50 ms | speedup | max abs diff |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for s in result["speedups"]:
            d = [
                p["max_abs_diff"]
                for p in result["rerank_parity"]
                if all(p[key] == s[key] for key in ("backend", "precision", "frames", "k"))
            ]
            lines.append(
                f"| {s['precision']} | {s['backend']} | {s['frames']} | {s['k']} | {s['cached_p50']:.2f} | "
                f"{s['monolithic_p50']:.2f} | {s['speedup']:.2f}x | {d[0] if d else float('nan'):.1e} |"
            )
    for p in result.get("attention_picks", []):
        lines += ["", f"Attention picks, {p['backend']} {p['precision']} F={p['frames']}: {p['summary']}", ""]
        lines += [f"- {line}" for line in p["picks"]]
    lines += [
        "",
        "| GMACs per pair (base) | F | fusion in backbone | stacked fusion layers | saving |",
        "|---|---:|---:|---:|---:|",
    ]
    for g in result["gmacs"]:
        lines.append(
            f"| {g['model']}, text {g['text_length']} | {g['frames']} | {g['fusion_in_backbone_gmacs']:.1f} | "
            f"{g['stacked_gmacs']:.1f} | {g['saving_pct']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path | BinaryIO) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["stage"] not in ("unavailable", "failed")]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    labels = [f"{r['stage']}\n{r['backend']} {r['precision']} F{r['frames']} k{r['k']}" for r in rows]
    ax.barh(
        range(len(rows)),
        [r["p50"] for r in rows],
        xerr=[[0] * len(rows), [r["p90"] - r["p50"] for r in rows]],
        color="#4c72b0",
    )
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ms (p50, bar to p90)")
    ax.set_title("egovlp-deploy end to end")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
