"""Training data loading on the CPU: what one DataLoader worker spends per batch, with and without the decoded-frame
cache, and PyAV's per-frame RGB conversion with a new vs a shared swscale converter.

    python scripts/bench_loader.py DATA_DIR OUT_DIR [--batches 150] [--epochs 2]

DATA_DIR is a dataset from `egovlp-deploy synth` (egoclip.csv + videos/). One process, one thread, the tiny recipe's
items (4 frames at 32 px, scene negatives on, batch 16 -> 32 clips) in a fixed shuffled order, collated (tokenised and
MLM-masked) as the trainer does. Writes OUT_DIR/loader.json (rows, machine, git sha, load average) and loader.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch


def conversion_rows(video: Path, frames: int) -> list[dict]:
    """ms per frame: `frame.to_ndarray(format='rgb24')` (a converter per frame) vs one shared VideoReformatter."""
    import av
    from av.video.reformatter import VideoReformatter

    def decoded():
        with av.open(str(video)) as container:
            return [f for _, f in zip(range(frames), container.decode(video=0))]

    rows = []
    for name, convert in [
        ("to_ndarray(format='rgb24')", lambda f: f.to_ndarray(format="rgb24")),
        (
            "shared VideoReformatter",
            (lambda r: lambda f: r.reformat(f, format="rgb24").to_ndarray())(VideoReformatter()),
        ),
    ]:
        fresh = decoded()  # fresh frames: a frame caches the converter it made, so a second pass would flatter it
        start = time.perf_counter()
        for frame in fresh:
            convert(frame)
        rows.append({"conversion": name, "ms_per_frame": (time.perf_counter() - start) / len(fresh) * 1e3})
    return rows


def loader_rows(data: Path, batches: int, epochs: int) -> list[dict]:
    from egovlp_deploy.data.egoclip import EgoClipDataset
    from egovlp_deploy.decoding import release_frame_cache
    from egovlp_deploy.tokenizer import load_tokenizer, train_demo_tokenizer
    from egovlp_deploy.trainer.batching import IndexedDataset, PretrainCollator

    tok_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "egovlp-bench-tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        train_demo_tokenizer(tok_dir)
    collator = PretrainCollator(load_tokenizer(tok_dir), 16, 0.15, 0)
    rows = []
    for cache_mb in (0, 2048):
        release_frame_cache()
        data_set = EgoClipDataset(
            data / "egoclip.csv", data / "videos", 4, 32, backend="pyav", seed=0, frame_cache_bytes=cache_mb * 2**20
        )
        items = IndexedDataset(data_set)
        order = list(range(len(items)))
        random.Random(0).shuffle(order)
        n = min(batches, len(order) // 16)
        for epoch in range(epochs):
            data_set.set_epoch(epoch)
            start = time.perf_counter()
            for b in range(n):
                collator([items[i] for i in order[b * 16 : (b + 1) * 16]])
            rows.append(
                {
                    "frame_cache_mb": cache_mb,
                    "epoch": epoch,
                    "batches": n,
                    "ms_per_batch": (time.perf_counter() - start) / n * 1e3,
                }
            )
            print(rows[-1], flush=True)
    release_frame_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="a dataset directory from `egovlp-deploy synth`")
    parser.add_argument("out", type=Path, help="where loader.json and loader.md go")
    parser.add_argument("--batches", type=int, default=150, help="batches per epoch (default 150 = the whole set)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per setting (default 2)")
    args = parser.parse_args(argv)
    from egovlp_deploy.benchmarking import git_sha
    from egovlp_deploy.checkpoint import atomic_write_bytes

    torch.set_num_threads(1)
    load_before = os.getloadavg()
    video = next((args.data / "videos").rglob("*.mp4"))
    conversion = conversion_rows(video, 300)
    loading = loader_rows(args.data, args.batches, args.epochs)
    meta = {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "git_sha": git_sha(),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "python": sys.version.split()[0],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "conversion": conversion, "loading": loading}
    atomic_write_bytes(args.out / "loader.json", json.dumps(result, indent=2).encode())
    lines = ["| PyAV RGB conversion | ms per frame |", "|---|---:|"]
    lines += [f"| {r['conversion']} | {r['ms_per_frame']:.3f} |" for r in conversion]
    lines += [
        "",
        "| frame cache (MiB) | epoch | ms per batch (16 clips + 16 negatives, collated) |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {r['frame_cache_mb']} | {r['epoch']} | {r['ms_per_batch']:.1f} |" for r in loading]
    lines += [
        "",
        f"{meta['machine']}, {meta['cpu_count']} CPUs, torch {meta['torch']}, git {meta['git_sha']}, "
        f"load average {load_before[0]:.2f} before / {meta['load_avg_after'][0]:.2f} after",
    ]
    atomic_write_bytes(args.out / "loader.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
