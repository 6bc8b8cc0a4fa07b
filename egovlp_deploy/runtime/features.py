"""Per-window features of one's own videos, in the layouts the official downstream heads consume.

- `dual` (EgoMQ / VSGN): one projected dual video embedding per window, `features` (T, P), as the official EgoVLP
  EgoMQ features (one vector per fixed window, in time order) — plus `timestamps` (T, 2) [start_sec, end_sec].
- `fusion` (EgoNLQ / VSLNet, the EgoVLPv2 recipe): the video and the query pass through the fusion encoder
  together, so the features depend on the query. Per (video, query): `video_cls` (Q, T, Dv), the fused video CLS
  of every window, and `text_tokens` (Q, T, L, Dt) with `text_mask` (Q, L), the fused text states, plus
  `timestamps`. Each window's fusion prefix is computed once and shared by all queries; each query's text prefix
  once and shared by all windows: only the fused top layers run per pair.

Windows: `--frames F --stride S` in source frames (the official feature convention: 16-frame windows, stride 16, at
the video's own rate); the engine's own frame count is sampled uniformly inside each window.

Output: OUT/<name>.safetensors (or `.npy` files per tensor with --format npy) and the sidecar OUT/<name>.json,
written atomically. <name> is the video's stem (`<folder>_<stem>` for the EgoClip chunk layout `<uid>/<n>.mp4`),
with `-<8 hex of the source path's sha256>` appended where two inputs of the run share it or OUT already holds that
name for another source, so no two videos ever share an output. A video is skipped only when its output exists
for the same source file (path, size, mtime) with the same settings and model (resumable); the others are written.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from .engines import EngineError, Runtime
from egovlp_deploy.video import VideoReadError

from .pipeline import ClipPipeline, expand_inputs, failure_of, failures_summary, plan_windows

MODES = ("dual", "fusion")


def _base_name(path: Path) -> str:
    # The EgoClip chunked layout names files <uid>/<n>.mp4: the stem alone would not say which video.
    return f"{path.parent.name}_{path.stem}" if path.stem.isdigit() else path.stem


def _source(path: Path) -> dict:
    """What identifies a source file: its resolved path, size and modification time."""
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _recorded_source(out: Path, name: str) -> str | None:
    """The source path the output `name` in `out` was written for (None: no such output)."""
    try:
        meta = json.loads((out / f"{name}.json").read_text())
        return (meta.get("source") or {}).get("path") or meta.get("video")
    except (OSError, ValueError, AttributeError):
        return None


def output_names(paths: list[Path], out: Path) -> dict[Path, str]:
    """A distinct output name per input path (see the module docstring). A source keeps the name it was written
    under before, whichever inputs come with it now; a new one takes its base name unless another input of this
    run or an existing output claims it."""
    base = {p: _base_name(p) for p in paths}
    shared = Counter(base.values())
    names = {}
    for p, name in base.items():
        source = str(p.resolve())
        hashed = f"{name}-{hashlib.sha256(os.fsencode(source)).hexdigest()[:8]}"
        recorded = _recorded_source(out, name)
        if recorded == source:
            names[p] = name
        elif _recorded_source(out, hashed) == source or recorded is not None or shared[name] > 1:
            names[p] = hashed
        else:
            names[p] = name
    return names


def _settings(runtime: Runtime, mode: str, frames: int, stride: int, queries: list[str]) -> dict:
    return {"model_id": runtime.model_id, "mode": mode, "window_frames": frames, "stride_frames": stride,
            "engine_frames": runtime.folder.config.video.num_frames, "queries": queries if mode == "fusion" else []}


def _done(out: Path, name: str, fmt: str, settings: dict, source: dict) -> bool:
    meta = out / f"{name}.json"
    key = "features" if settings["mode"] == "dual" else "video_cls"
    data_file = out / (f"{name}.safetensors" if fmt == "safetensors" else f"{name}.{key}.npy")
    if not (meta.is_file() and data_file.is_file()):
        return False
    try:
        recorded = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return recorded.get("settings") == settings and recorded.get("source") == source


def _write(out: Path, name: str, fmt: str, tensors: dict[str, np.ndarray], meta: dict) -> None:
    """Tensors first, the JSON sidecar last: the sidecar is the 'done' mark a resumed run trusts."""
    from egovlp_deploy.checkpoint import atomic_write_bytes

    if fmt == "safetensors":
        from safetensors.numpy import save

        atomic_write_bytes(out / f"{name}.safetensors",
                           save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                metadata={"settings": json.dumps(meta["settings"])}))
    else:
        import io

        for key, value in tensors.items():
            buf = io.BytesIO()
            np.save(buf, value, allow_pickle=False)
            atomic_write_bytes(out / f"{name}.{key}.npy", buf.getvalue())
    atomic_write_bytes(out / f"{name}.json", json.dumps(meta, indent=1).encode())


def extract_features(videos: list[str | os.PathLike], runtime: Runtime, out: str | os.PathLike, mode: str = "dual",
                     frames: int = 16, stride: int = 16, queries: list[str] | None = None, fmt: str = "safetensors",
                     batch: int = 8, progress: bool = True, decode_backend: str = "auto") -> dict:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if fmt not in ("safetensors", "npy"):
        raise ValueError(f"format must be safetensors or npy, got {fmt!r}")
    if frames < 1 or stride < 1:
        raise ValueError(f"--frames and --stride must be positive, got {frames}, {stride}")
    queries = list(queries or [])
    if mode == "fusion" and not queries:
        raise ValueError("fusion features depend on the query: give --query TEXT (repeatable) or --queries FILE")
    if not videos:
        raise ValueError("no videos given")
    paths, failures = expand_inputs(videos)
    if not paths:
        raise ValueError("no video files: " + "; ".join(f.line() for f in failures))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = runtime.folder.config.video
    pipe = ClipPipeline(cfg.num_frames, cfg.img_size, decode_backend)
    settings = _settings(runtime, mode, frames, stride, queries)
    text = runtime.text_encoder.encode(queries) if mode == "fusion" else None
    names = output_names(paths, out)
    todo, skipped = [], 0
    for path in paths:
        source = _source(path)
        if _done(out, names[path], fmt, settings, source):
            skipped += 1
            continue
        try:
            windows, fps = plan_windows(path, cfg.num_frames, window_frames=frames, stride_frames=stride,
                                        backend=decode_backend)
        except VideoReadError as exc:  # this file cannot be read: report it, do the others
            failures.append(failure_of(path, exc))
            continue
        todo.append((path, source, windows, fps))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(w) for _, _, w, _ in todo), unit="window", desc=f"features ({mode})",
                   dynamic_ncols=True)
    written, windows_total, t0 = 0, 0, time.perf_counter()
    for path, source, windows, fps in todo:
        name = names[path]
        tensors: dict[str, list] = {}
        for i in range(0, len(windows), batch):
            try:
                clips = pipe.clips(path, windows[i:i + batch])
            except VideoReadError as exc:
                failures.append(failure_of(path, exc))
                if bar is not None:
                    bar.total -= len(windows) - i
                    bar.refresh()
                break
            if mode == "dual":
                tensors.setdefault("features", []).append(runtime.video_encoder.encode(clips))
            else:
                prefix = runtime.video_encoder.fusion_prefix(clips)  # (b, T, Dv), shared by every query
                cls, tok = [], []
                for q in range(len(queries)):
                    c, t = _fused(runtime, prefix, text.prefix[q], text.mask[q])
                    cls.append(c)
                    tok.append(t)
                tensors.setdefault("video_cls", []).append(np.stack(cls))  # (Q, b, Dv)
                tensors.setdefault("text_tokens", []).append(np.stack(tok))  # (Q, b, L, Dt)
            if bar is not None:
                bar.update(len(clips))
        else:  # every window encoded
            _finish(out, name, fmt, mode, tensors, windows, text, source, fps, settings)
            written += 1
            windows_total += len(windows)
    if bar is not None:
        bar.close()
    return {"out": str(out), "written": written, "skipped": skipped, "windows": windows_total, "mode": mode,
            "succeeded": written + skipped, "outputs": {str(p): names[p] for p in paths},
            "failed": failures_summary(failures),
            "seconds": round(time.perf_counter() - t0, 2), "backend": runtime.summary()}


def _finish(out, name, fmt, mode, tensors, windows, text, source, fps, settings) -> None:
    """Concatenate one video's batches and write its output."""
    axis = 0 if mode == "dual" else 1
    result = {k: np.concatenate(v, axis=axis).astype(np.float32) for k, v in tensors.items()}
    result["timestamps"] = np.array([[w.start_sec, w.end_sec] for w in windows], np.float64)
    if mode == "fusion":
        result["text_mask"] = text.mask.astype(np.int64)
    meta = {"video": source["path"], "source": source, "fps": fps, "windows": len(windows),
            "settings": settings, "shapes": {k: list(v.shape) for k, v in result.items()}}
    _write(out, name, fmt, result, meta)


def _fused(runtime: Runtime, video_prefix: np.ndarray, text_prefix: np.ndarray, mask: np.ndarray):
    """The fusion head over b windows and one query -> (video_cls (b, Dv), text_tokens (b, L, Dt))."""
    runner = runtime.runner("fusion_head")
    b = len(video_prefix)
    tp = np.broadcast_to(text_prefix, (b, *text_prefix.shape))
    m = np.broadcast_to(mask, (b, mask.shape[0]))
    cls, tok = [], []
    for s in range(0, b, runtime.max_batch):
        o = runner(video_prefix=video_prefix[s:s + runtime.max_batch], text_prefix=tp[s:s + runtime.max_batch],
                   attention_mask=m[s:s + runtime.max_batch])
        cls.append(o["video_cls"])
        tok.append(o["text_hidden"])
    if not cls:
        raise EngineError("no windows")
    return np.concatenate(cls), np.concatenate(tok)
