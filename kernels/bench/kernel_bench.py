"""`egovlp-deploy bench kernels`: the Triton attention kernels against reference, SDPA and torch.compile.

Protocol (BENCHMARKS.md, "Kernels (Triton)"): for every shape, each backend runs the same inputs (random, never
zeros); medians of `triton.testing.do_bench` on the GPU (CPU --quick: medians of a few wall-clock runs, only to prove
the plumbing). Reported per row: ms, speedup over `reference`, bytes moved (each aten op's tensor inputs and outputs
counted once, a no-cache upper estimate; the fused op counts exactly its inputs + output) against the minimum (inputs
read once, output written once), and achieved GB/s (minimum bytes / time) as a fraction of the card's measured
device-to-device copy bandwidth. On the GPU each backend is also timed as the replay of a CUDA graph captured from
it (`graph ms`): the same GPU work without the host launch path (Python, op dispatch, Triton's launcher), so the two
columns together say whether a small case is bound by the GPU or by the host. `triton-1split` is the Triton kernel
with the few-query sides unsplit (the CLS row of the divided core, the text queries of the text<-video core: one
program per query tile walks every key), next to `triton`, which splits their keys over several programs.
While the run goes on, the rows so far are in kernels.json with "complete": false (and a first line in kernels.md
saying so, no kernels.png); a run without a CUDA device says that its times only check the plumbing.
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from egovlp_deploy.benchmarking import ResultsFolder, machine, parse_int_list, parse_name_list
from egovlp_deploy.benchmarking import git_sha as _git_sha
from egovlp_deploy.errors import error_line

DESCRIPTION = __doc__

BACKENDS = ("reference", "sdpa", "compile", "triton", "triton-1split")


@contextmanager
def _one_split():
    """The Triton kernels with their few-query sides unsplit, for `triton-1split`."""
    from .. import divided_attention as da
    from .. import gated_cross_attention as gca

    saved = da.CLS_SPLITS, gca.KEY_SPLITS
    da.CLS_SPLITS = gca.KEY_SPLITS = lambda programs, keys: 1
    try:
        yield
    finally:
        da.CLS_SPLITS, gca.KEY_SPLITS = saved


def _unsplit(fn):
    def call():
        with _one_split():
            return fn()

    return call


@dataclass
class Row:
    case: str  # what is timed, e.g. "divided core time"
    shape: str  # B, F, N, L
    backend: str
    ms: float | None
    speedup: float | None = None  # reference ms / this ms
    bytes_moved: int | None = None
    min_bytes: int | None = None
    max_rel_err: float | None = None  # vs the reference backend's output on the same inputs
    gbps: float | None = None  # min_bytes / time
    copy_fraction: float | None = None  # gbps / measured copy bandwidth
    graph_ms: float | None = None  # replay of a CUDA graph of the same call (GPU only)
    note: str = ""


def add_arguments(parser) -> None:
    parser.add_argument(
        "--out",
        default="bench_results/kernels",
        metavar="DIR",
        help="output folder for kernels.json, kernels.md, kernels.png (default: %(default)s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes, few repeats; on a CPU-only machine runs the Triton interpreter",
    )
    shapes = parser.add_argument_group("shapes (GPU run)")
    shapes.add_argument("--batches", default="1,8,32", help="batch sizes B (default: %(default)s)")
    shapes.add_argument("--frames", dest="frame_counts", default="4,16", help="frame counts F (default: %(default)s)")
    shapes.add_argument("--text-lengths", default="15,30", help="text lengths L (default: %(default)s)")
    shapes.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    shapes.add_argument("--backends", default=",".join(BACKENDS), help="subset of %(default)s")
    shapes.add_argument("--no-encoder", action="store_true", help="skip the full dual video encoder timing")


# -- measuring ----------------------------------------------------------------------------------------------------
def _timer(device: str, quick: bool):
    if device == "cuda":
        import triton.testing

        def gpu(fn):
            return float(
                triton.testing.do_bench(fn, warmup=25 if quick else 100, rep=50 if quick else 200, return_mode="median")
            )

        return gpu

    def cpu(fn):
        fn()  # warm-up (compilation, caches)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu


def graph_replay(fn):
    """A CUDA graph of one call of fn (already warmed up: autotuning and compilation done), as a replay function.
    Warm-up on a side stream before capture, as torch.cuda.graphs requires."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth(device: str, timer) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + bytes written), 1 GiB buffer on the GPU."""
    import torch

    n = (1 << 30) // 2 if device == "cuda" else 1 << 24
    src = torch.randn(n, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * src.nbytes / ms / 1e6


def bytes_moved(fn) -> int:
    """Sum over the aten ops fn runs of the bytes of their tensor inputs and outputs (views move nothing)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not getattr(func, "is_view", False) and func.namespace != "prim":
                flat = tree_flatten((args, kwargs or {}, out))[0]
                Count.total += sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))
            return out

    with torch.no_grad(), Count():
        fn()
    return Count.total


# -- the cases ------------------------------------------------------------------------------------------------------
def _cases(B, F, N, L, width, heads, dtype, device, backends, divided=True):
    """Yield (case, shape, {backend: fn}, min_bytes) for the attention cores and the whole blocks (the divided
    cases do not depend on L: `divided` is False for the second text length)."""
    import torch

    from ...model.attention import divided_attention_tokens, multihead_attention
    from ...model.video_tower import DividedSelfAttention
    from ..gated_cross_attention import gated_residual

    es = torch.finfo(dtype).bits // 8
    S, D = 1 + F * N, width // heads
    scale = D**-0.5
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    shape = f"B={B} F={F} N={N} L={L}"
    qkv = rnd(B, S, 3 * width)
    for mode in ("time", "space") if divided else ():
        fns = {
            b: (lambda b=b, mode=mode: divided_attention_tokens(qkv, heads, F, mode, scale, b))
            for b in ("reference", "sdpa", "triton")
            if b in backends
        }
        if "compile" in backends:
            fns["compile"] = _compiled(lambda x, mode=mode: divided_attention_tokens(x, heads, F, mode, scale), qkv)
        if "triton-1split" in backends:
            fns["triton-1split"] = _unsplit(
                lambda mode=mode: divided_attention_tokens(qkv, heads, F, mode, scale, "triton")
            )
        yield f"divided core {mode}", f"B={B} F={F} N={N}", fns, 4 * B * S * width * es

    # Whole divided block: LN + qkv + time attention + proj, then LN + qkv + space attention + proj (no MLP).
    norm3, norm1 = (torch.nn.LayerNorm(width).to(device, dtype) for _ in range(2))
    timeattn = DividedSelfAttention(width, heads, "time").to(device, dtype).eval()
    attn = DividedSelfAttention(width, heads, "space", text_width=width).to(device, dtype).eval()
    torch.nn.init.normal_(attn.alpha_i2t, std=0.5)
    x = rnd(B, S, width)

    def block(backend, x=x):
        timeattn.attention_backend = attn.attention_backend = attn.attn_i2t.attention_backend = backend
        return attn(norm1(x + timeattn(norm3(x), F)), F)

    if divided:
        yield "divided block (time+space)", f"B={B} F={F} N={N}", _with_compile(block, backends, x), None

    # Cross-attention cores: video side (all S video queries vs L masked text keys), text side (L vs S, no mask).
    text_kv = rnd(B, L, 2 * width)
    k_t, v_t = text_kv.chunk(2, dim=-1)
    bias = torch.zeros(B, 1, 1, L, device=device, dtype=dtype)
    bias[-1, ..., L // 2 :] = torch.finfo(dtype).min
    q_v = rnd(B, S, width)
    fns = {
        b: (lambda b=b: multihead_attention(q_v, k_t, v_t, heads, scale, bias, b))
        for b in ("reference", "sdpa", "triton")
        if b in backends
    }
    if "compile" in backends:
        fns["compile"] = _compiled(lambda q: multihead_attention(q, k_t, v_t, heads, scale, bias), q_v)
    yield "cross core video<-text", shape + " (Lk=L)", fns, (2 * B * S * width + 2 * B * L * width + B * L) * es

    q_t, vk, vv = rnd(B, L, width), rnd(B, S, width), rnd(B, S, width)
    fns = {
        b: (lambda b=b: multihead_attention(q_t, vk, vv, heads, scale, None, b))
        for b in ("reference", "sdpa", "triton")
        if b in backends
    }
    if "compile" in backends:
        fns["compile"] = _compiled(lambda q: multihead_attention(q, vk, vv, heads, scale), q_t)
    if "triton-1split" in backends:
        fns["triton-1split"] = _unsplit(lambda: multihead_attention(q_t, vk, vv, heads, scale, None, "triton"))
    yield "cross core text<-video", shape + " (Lk=S)", fns, (2 * B * L * width + 2 * B * S * width) * es

    # The video-side cross-attention branch: text k/v Linear, LN + q Linear, core, proj, gated residual.
    h = rnd(B, S, width)
    text = rnd(B, L, width)

    def branch(backend, h=h):
        attn.attn_i2t.attention_backend = backend
        k, v = attn.qkv_text_i2t(text).chunk(2, dim=-1)
        cross = attn.attn_i2t(attn.qkv_i2t(attn.norm_i2t_i(h)), k, v, bias)
        y = attn.proj_i2t(cross)
        return h + attn.alpha_i2t * y if backend == "reference" else gated_residual(h, attn.alpha_i2t, y)

    yield "cross branch video<-text", shape, _with_compile(branch, backends, h), None


def _compiled(fn, example):
    import torch

    compiled = torch.compile(fn, dynamic=False)
    return lambda: compiled(example)


def _with_compile(fn, backends, example):
    fns = {b: (lambda b=b: fn(b)) for b in ("reference", "sdpa", "triton") if b in backends}
    if "compile" in backends:
        fns["compile"] = _compiled(lambda x: fn("reference", x), example)
    return fns


def _encoder_case(quick, dtype, device, backends):
    """The full dual video encoder (base tower, B=1, F=16; the tiny tower in --quick)."""
    import torch

    from ...config import EgoVLPv2Config
    from ...model.video_tower import SpaceTimeTransformer

    config = EgoVLPv2Config.tiny(num_frames=2) if quick else EgoVLPv2Config.base(num_frames=16)
    v = config.video
    tower = SpaceTimeTransformer(v, config.num_fuse_blocks, v.width).to(device, dtype).eval()
    video = torch.randn(1, v.num_frames, 3, v.img_size, v.img_size, device=device, dtype=dtype)

    def run(backend, video=video):
        for m in tower.modules():
            if hasattr(m, "attention_backend"):
                m.attention_backend = backend
        return tower(video)

    shape = f"B=1 F={v.num_frames} N={v.patches_per_frame} (dual video encoder, {v.depth} blocks)"
    return "video encoder", shape, _with_compile(run, backends, video), None


# -- report ---------------------------------------------------------------------------------------------------------
def _markdown(meta: dict, rows: list[Row]) -> str:
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    lines = [
        f"Device: {meta['device']}; dtype {meta['dtype']}; torch {meta['torch']}, triton {meta['triton']}; "
        f"copy bandwidth {meta['copy_gbps']:.0f} GB/s; git {meta['git_sha']}; {meta['mode']}; {meta['time']}",
        "",
        *([f"{meta['note']}", ""] if meta.get("note") else []),
        "| case | shape | backend | ms | graph ms | speedup | max rel err | bytes moved / min | GB/s | of copy BW "
        "| note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = None if r.bytes_moved is None or not r.min_bytes else r.bytes_moved / r.min_bytes
        lines.append(
            f"| {r.case} | {r.shape} | {r.backend} | {f(r.ms, '.4f')} | {f(r.graph_ms, '.4f')} | "
            f"{f(r.speedup, '.2f')} | "
            f"{f(r.max_rel_err, '.1e')} | {f(ratio, '.1f')} | {f(r.gbps, '.0f')} | "
            f"{f(r.copy_fraction, '.0%')} | {r.note} |"
        )
    return "\n".join(lines) + "\n"


def _plot(rows: list[Row], path: Path | BinaryIO, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r.case, r.shape) for r in rows}, key=lambda k: [(r.case, r.shape) for r in rows].index(k))
    backends = [b for b in BACKENDS if any(r.backend == b for r in rows)]
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(groups) * len(backends)), 5))
    width = 0.8 / max(len(backends), 1)
    for i, b in enumerate(backends):
        ys = []
        for case, shape in groups:
            match = [r for r in rows if r.case == case and r.shape == shape and r.backend == b]
            ys.append(match[0].speedup if match and match[0].speedup else 0.0)
        ax.bar([j + i * width for j in range(len(groups))], ys, width, label=b)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{c}\n{s}" for c, s in groups], rotation=75, fontsize=6, ha="right")
    ax.set_ylabel("speedup over reference (higher is better)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    import torch

    # every argument is checked before anything runs, on any machine
    backends = parse_name_list(args.backends, "--backends", BACKENDS)
    batches = parse_int_list(args.batches, "--batches")
    frame_counts = parse_int_list(args.frame_counts, "--frames")
    text_lengths = parse_int_list(args.text_lengths, "--text-lengths")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not args.quick:
            raise ValueError(
                "the kernel benchmark needs a CUDA GPU; --quick runs tiny shapes in the Triton "
                "interpreter to check the plumbing"
            )
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules are imported
    with ResultsFolder(args.out, "kernels", ("kernels.json", "kernels.md", "kernels.png")) as results:
        return _run(args, results, device, backends, batches, frame_counts, text_lengths)


def _run(args, results: ResultsFolder, device, backends, batches, frame_counts, text_lengths) -> int:
    import torch
    import triton

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if device == "cpu" and dtype != torch.float32:
        dtype = torch.float32  # CPU half matmuls are emulated slowly, and the interpreter's bf16 dot is wrong
    if device == "cpu" and "compile" in backends:
        backends.remove("compile")  # inductor's CPU build takes minutes: out of place in a plumbing check
    timer = _timer(device, args.quick)
    if args.quick:
        shapes, width, heads = [(1, 2, 9, 5)], 32, 2
    else:
        shapes = [(B, F, 196, L) for B in batches for F in frame_counts for L in text_lengths]
        width, heads = 768, 12

    copy_gbps = copy_bandwidth(device, timer)
    rows: list[Row] = []
    first_L = {}
    cases = (
        c
        for B, F, N, L in shapes
        for c in _cases(B, F, N, L, width, heads, dtype, device, backends, divided=first_L.setdefault((B, F), L) == L)
    )
    if not args.no_encoder:
        cases = itertools.chain(cases, [None])  # built lazily: the base tower is large
    meta = _meta(device, dtype, copy_gbps, args.quick, triton.__version__)
    for item in cases:
        case, shape, fns, min_bytes = item or _encoder_case(args.quick, dtype, device, backends)
        case_rows = []
        with torch.no_grad():
            try:
                expected = fns["reference"]().float() if "reference" in fns else None
            except Exception:
                expected = None
        for backend in BACKENDS:
            if backend not in fns:
                continue
            row = Row(case, shape, backend, None, min_bytes=min_bytes)
            try:
                with torch.no_grad():
                    if expected is not None:
                        got = fns[backend]().float()
                        row.max_rel_err = ((got - expected).abs().max() / expected.abs().max()).item()
                    row.ms = timer(fns[backend])
                    if device == "cuda":
                        try:
                            row.graph_ms = timer(graph_replay(fns[backend]))
                        except Exception as exc:  # e.g. an op that cannot be captured: the eager time stands
                            row.note = f"no graph: {error_line(exc, 60)}"
                    if backend != "compile" and min_bytes is not None:
                        row.bytes_moved = bytes_moved(fns[backend])
            except Exception as exc:  # a backend failing at a shape is a result (e.g. SDPA's grid limit)
                row.note = error_line(exc, 80)
                # the note is one line; the log keeps the whole traceback (an Inductor assertion's message is empty)
                print(f"{case} {shape} {backend} failed:", file=sys.stderr)
                traceback.print_exc(file=sys.stderr)
            if row.ms and min_bytes:
                row.gbps = min_bytes / row.ms / 1e6
                row.copy_fraction = row.gbps / copy_gbps
            case_rows.append(row)
        ref = next((r.ms for r in case_rows if r.backend == "reference" and r.ms), None)
        for r in case_rows:
            r.speedup = ref / r.ms if ref and r.ms else None
        rows += case_rows
        print(
            f"{case:<28} {shape:<40} "
            + "  ".join(f"{r.backend}={r.ms:.3f}ms" if r.ms else f"{r.backend}=fail" for r in case_rows),
            flush=True,
        )
        _write(results, meta, rows, complete=False)  # a run cut short still leaves its rows, marked incomplete
    _write(results, meta, rows, complete=True)
    print(f"wrote {args.out}/kernels.json, kernels.md, kernels.png")
    return 0


def _meta(device, dtype, copy_gbps, quick, triton_version) -> dict:
    import torch

    cpu = device != "cuda"
    return {
        "device": torch.cuda.get_device_name(0) if not cpu else "CPU (no CUDA device; Triton interpreter)",
        "note": "CPU run: the times and ratios only check the plumbing (the Triton kernels run in the interpreter)"
        if cpu
        else "",
        "machine": machine(),
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "triton": triton_version,
        "copy_gbps": copy_gbps,
        "git_sha": _git_sha(),
        "mode": "quick" if quick else "full",
        "timer": "triton.testing.do_bench median" if device == "cuda" else "median of 3 wall-clock runs",
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _write(results: ResultsFolder, meta: dict, rows: list[Row], complete: bool) -> None:
    title = f"egovlp-deploy attention kernels, {meta['device']}, {meta['dtype']}"
    results.write(
        {"meta": meta, "rows": [asdict(r) for r in rows]},
        _markdown(meta, rows),
        lambda path: _plot(rows, path, title),
        complete=complete,
    )
