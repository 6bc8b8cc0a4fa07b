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
name (an output, or a partial one as below) for another source, so no two videos ever share an output. A video is
skipped only when its sidecar records the same source file (path, size, mtime), settings, model, engines (backend
and precision) and format and every tensor file it lists is there; the others are written. Rewriting a video's
output (other settings, engines, format or mode) first removes the earlier output's files that the new one does not
replace (those its sidecar lists), then that sidecar, so an output never holds files of two runs' settings and a
kill meanwhile leaves the video not done.

Resuming inside a video: a video is encoded in parts of `commit_every` windows (--commit-every, default 32), and
every part but the last is committed to the work folder OUT/.partial/<name>/: part-NNNNN.safetensors (temp file +
rename), then progress.json (also temp + rename, the commit point), which lists the parts and records the source
file, settings (model and engines among them) and window plan they were made with. A killed run so loses at most the
part in progress: the next run of the same source with the same settings continues from the first window not
committed and writes the same output, bit for bit, as an uninterrupted run; a record of another file or other
settings is discarded. The output is assembled from the parts and written as above, then the work folder is
removed. Only the names this tool writes there (parts, progress.json, their temp files) are ever deleted; any other
file stays, and so does its folder.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from egovlp_deploy.decoding import VideoReadError

from ..checkpoint import atomic_temp_names
from ..folder_lock import exclusive_writer
from ..jsonfile import read_json
from ..path_text import utf8_path
from .clip_pipeline import ClipPipeline, expand_inputs, failure_of, failures_summary, plan_windows
from .engines import EngineError, Runtime

if TYPE_CHECKING:
    from collections.abc import Callable

MODES = ("dual", "fusion")
FORMATS = ("safetensors", "npy")
COMMIT_EVERY = 32  # windows per committed part: at most this many are recomputed after a kill
PARTIAL = ".partial"  # OUT/.partial/<name>/: the committed parts of a video not finished yet
RECORD = "progress.json"
RECORD_FORMAT = "egovlp-deploy-features-progress"
# The only names deleted in a work folder: parts, the record, and the temp files of their atomic writes.
_NAMES = r"(part-\d{5}\.safetensors|progress\.json)"
_OURS = re.compile(rf"{_NAMES}|\.{_NAMES}\..+\.tmp")
_PART = re.compile(r"part-\d{5}\.safetensors")
TENSORS = ("features", "timestamps", "video_cls", "text_tokens", "text_mask")  # the tensors an output may hold
# The files of an output <name>, after its name: .safetensors, .json or .<tensor>.npy
_OUTPUT_SUFFIXES = r"\.(safetensors|json|(" + "|".join(TENSORS) + r")\.npy)"


def _base_name(path: Path) -> str:
    # The EgoClip chunked layout names files <uid>/<n>.mp4: the stem alone would not say which video.
    return f"{path.parent.name}_{path.stem}" if path.stem.isdigit() else path.stem


def _source(path: Path) -> dict:
    """What identifies a source file: its resolved path, size and modification time."""
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _recorded_source(out: Path, name: str) -> str | None:
    """The source path the output `name` in `out` was written, or partly written, for (None: neither), as
    `utf8_path` writes it."""
    for meta_file in (out / f"{name}.json", out / PARTIAL / name / RECORD):
        try:
            meta = read_json(meta_file)
            path = (meta.get("source") or {}).get("path") or meta.get("video")
        except (OSError, ValueError, AttributeError):
            continue
        if path:
            return utf8_path(path)
    # The tensors are written before the sidecar: a run killed between the two leaves a safetensors output whose
    # header names its source (a .npy output leaves its progress record, read above).
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(out / f"{name}.safetensors"), framework="numpy") as f:
            return (f.metadata() or {}).get("source") or None
    except (OSError, SafetensorError, ValueError):
        return None


def output_names(paths: list[Path], out: Path) -> dict[Path, str]:
    """A distinct output name per input path (see the module docstring). A source keeps the name it was written
    under before, whichever inputs come with it now; a new one takes its base name unless another input of this
    run or an existing output claims it."""
    base = {p: _base_name(p) for p in paths}
    shared = Counter(base.values())
    names = {}
    for p, name in base.items():
        resolved = str(p.resolve())
        source = utf8_path(resolved)
        hashed = f"{name}-{hashlib.sha256(os.fsencode(resolved)).hexdigest()[:8]}"
        recorded, recorded_hashed = _recorded_source(out, name), _recorded_source(out, hashed)
        if recorded == source:
            names[p] = name
        elif recorded_hashed == source or recorded is not None or shared[name] > 1 or _occupied(out, name):
            if recorded_hashed != source and _occupied(out, hashed):
                raise ValueError(
                    f"{out}: holds files named {name}.* and {hashed}.* that this tool did not write; they are "
                    f"left as they are: give another --out for {p}"
                )
            names[p] = hashed
        else:
            names[p] = name
    return names


def _occupied(out: Path, name: str) -> bool:
    """Whether `out` holds a file the output `name` would replace (the sidecar, the safetensors file or a .npy
    file): a caller asks only where no sidecar of ours claims the name, so the file is someone else's and stays."""
    files = [out / f"{name}.json", out / f"{name}.safetensors", *out.glob(f"{glob.escape(name)}.*.npy")]
    return any(f.exists() or f.is_symlink() for f in files)


def _settings(runtime: Runtime, mode: str, frames: int, stride: int, queries: list[str]) -> dict:
    return {
        "model_id": runtime.model_id,
        # features of another backend or precision differ in their last digits (int8: more): not the same output
        "engines": {"backend": runtime.backend, "precision": runtime.precision},
        "mode": mode,
        "window_frames": frames,
        "stride_frames": stride,
        "engine_frames": runtime.folder.config.video.num_frames,
        "queries": queries if mode == "fusion" else [],
    }


def _output_files(out: Path, name: str, fmt: str, keys) -> list[Path]:
    """The tensor files of the output `name` in format `fmt` with tensors `keys`."""
    return [out / f"{name}.safetensors"] if fmt == "safetensors" else [out / f"{name}.{k}.npy" for k in keys]


def _sidecar(out: Path, name: str) -> dict | None:
    """The output `name`'s JSON sidecar (None: none, or not a record of ours)."""
    try:
        meta = read_json(out / f"{name}.json")
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("shapes"), dict) and meta["shapes"] else None


def _done(out: Path, name: str, fmt: str, settings: dict, source: dict) -> bool:
    """The sidecar records this source, these settings and this format, and every tensor file it lists is there."""
    meta = _sidecar(out, name)
    return (
        meta is not None
        and meta.get("format") == fmt
        and meta.get("settings") == settings
        and meta.get("source") == source
        and all(f.is_file() for f in _output_files(out, name, fmt, meta["shapes"]))
    )


def _write(out: Path, name: str, fmt: str, tensors: dict[str, np.ndarray], meta: dict) -> None:
    """Tensors first, the JSON sidecar last: the sidecar is the 'done' mark a resumed run trusts. An earlier
    output of the same source under `name` (other settings, format or mode) goes first: the tensor files its
    sidecar lists that this output does not replace, then the sidecar, so no sidecar ever vouches for files of
    other settings, and a run killed in between leaves a video that is not done. The temp files of a write of
    this output that a kill stopped go too."""
    from egovlp_deploy.checkpoint import atomic_write_bytes, stable_safetensors

    temp = atomic_temp_names(re.escape(name) + _OUTPUT_SUFFIXES)  # the temp files of a killed write of this output
    for f in out.glob(f".{glob.escape(name)}.*.tmp"):
        if temp.fullmatch(f.name) and f.is_file():
            f.unlink()
    earlier = _sidecar(out, name)
    if earlier is not None and (earlier.get("source") or {}).get("path") == meta["source"]["path"]:
        keep = set(_output_files(out, name, fmt, tensors))
        if earlier.get("format") in FORMATS:  # a sidecar that does not say its format lists no files of ours
            for f in _output_files(out, name, earlier["format"], set(earlier["shapes"]) & set(TENSORS)):
                if f not in keep and f.is_file():
                    f.unlink()
        (out / f"{name}.json").unlink()
    if fmt == "safetensors":
        from safetensors.numpy import save

        atomic_write_bytes(
            out / f"{name}.safetensors",
            stable_safetensors(
                save(
                    {k: np.ascontiguousarray(v) for k, v in tensors.items()},
                    metadata={"settings": json.dumps(meta["settings"]), "source": utf8_path(meta["source"]["path"])},
                )
            ),
        )
    else:
        import io

        for key, value in tensors.items():
            buf = io.BytesIO()
            np.save(buf, value, allow_pickle=False)
            atomic_write_bytes(out / f"{name}.{key}.npy", buf.getvalue())
    atomic_write_bytes(out / f"{name}.json", json.dumps(meta, indent=1).encode())


# -- the work folder of a video in progress ----------------------------------------------------------------------
def _work(out: Path, name: str) -> Path:
    return out / PARTIAL / name


def _clear(work: Path, keep: frozenset[str] = frozenset()) -> None:
    """Delete what this tool writes in a work folder (parts, the record, their temp files) but `keep`, then the
    folder and OUT/.partial where that leaves them empty. Any other file stays, and so does its folder."""
    if not work.is_dir():
        return
    for p in work.iterdir():
        if _OURS.fullmatch(p.name) and p.name not in keep and not p.is_dir():
            p.unlink()
    for folder in (work, work.parent):
        try:
            folder.rmdir()
        except OSError:  # not empty
            break


def _part_rows(path: Path, mode: str) -> int | None:
    """The number of windows in a part file (None: missing, unreadable, or not a part of this mode)."""
    from safetensors import SafetensorError, safe_open

    keys, axis = (("features",), 0) if mode == "dual" else (("video_cls", "text_tokens"), 1)
    try:
        with safe_open(str(path), framework="numpy") as f:
            rows = {f.get_slice(k).get_shape()[axis] for k in keys}
    except (OSError, SafetensorError, IndexError):
        return None
    return rows.pop() if len(rows) == 1 else None


def _intact(work: Path, record: dict, mode: str) -> bool:
    """Every part the record lists is there, with its windows, and together they are the first record['done']."""
    start = 0
    for p in record["parts"]:
        if not _PART.fullmatch(p["file"]) or p["start"] != start or _part_rows(work / p["file"], mode) != p["count"]:
            return False
        start += p["count"]
    return start == record["done"]


def _resume(work: Path, source: dict, settings: dict, windows: int, fps: float) -> dict:
    """The progress record to continue from: the work folder's, when it was made for the same source file,
    settings, model and window plan and its parts are intact; otherwise a new one, and the old parts are deleted."""
    new = {
        "format": RECORD_FORMAT,
        "source": source,
        "settings": settings,
        "fps": fps,
        "windows": windows,
        "done": 0,
        "parts": [],
    }
    try:
        record = read_json(work / RECORD)
        usable = (
            record.get("format") == RECORD_FORMAT
            and all(record.get(k) == new[k] for k in ("source", "settings", "fps", "windows"))
            and _intact(work, record, settings["mode"])
        )
    except (OSError, ValueError, AttributeError, KeyError, TypeError):  # none, or not a record of ours
        usable = False
    if not usable:
        _clear(work)
        return new
    _clear(work, frozenset([RECORD, *(p["file"] for p in record["parts"])]))  # what a killed run left uncommitted
    return record


def _commit(work: Path, record: dict, tensors: dict[str, np.ndarray], count: int) -> None:
    """Write one part of `count` windows, then list it in the record: from then on it is committed."""
    from safetensors.numpy import save

    from egovlp_deploy.checkpoint import atomic_write_bytes

    work.mkdir(parents=True, exist_ok=True)
    name = f"part-{len(record['parts']):05d}.safetensors"
    atomic_write_bytes(work / name, save({k: np.ascontiguousarray(v) for k, v in tensors.items()}))
    record["parts"].append({"file": name, "start": record["done"], "count": count})
    record["done"] += count
    _write_record(work, record)


def _write_record(work: Path, record: dict) -> None:
    from egovlp_deploy.checkpoint import atomic_write_bytes

    work.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(work / RECORD, json.dumps(record, indent=1).encode())


def _load_parts(work: Path, parts: list[dict]) -> list[dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    return [load_file(str(work / p["file"])) for p in parts]


def extract_features(
    videos: list[str | os.PathLike],
    runtime: Runtime,
    out: str | os.PathLike,
    mode: str = "dual",
    frames: int = 16,
    stride: int = 16,
    queries: list[str] | None = None,
    fmt: str = "safetensors",
    batch: int = 8,
    progress: bool = True,
    decode_backend: str = "auto",
    commit_every: int = COMMIT_EVERY,
    on_commit: Callable[[int], object] | None = None,
) -> dict:
    """Write the features of `videos` into `out` (see the module docstring); returns a summary dict.

    commit_every: windows per committed part of a long video (at most this many are recomputed after a kill).
    on_commit(n) is called each time windows are committed (a part, or a finished video's output) with the number
    of windows this run has committed so far (progress reporting, tests)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be safetensors or npy, got {fmt!r}")
    if frames < 1 or stride < 1:
        raise ValueError(f"--frames and --stride must be positive, got {frames}, {stride}")
    if commit_every < 1:
        raise ValueError(f"--commit-every must be positive, got {commit_every}")
    queries = list(queries or [])
    if mode == "fusion" and not queries:
        raise ValueError("fusion features depend on the query: give --query TEXT (repeatable) or --queries FILE")
    if not videos:
        raise ValueError("no videos given")
    paths, failures = expand_inputs(videos)
    if not paths:
        raise ValueError("no video files: " + "; ".join(f.line() for f in failures))
    roles = ("video_encoder",) if mode == "dual" else ("text_encoder", "video_fusion_prefix", "fusion_head")
    runtime.check_roles(*roles)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_writer(out, "features folder", ValueError):
        return _extract(
            out, paths, failures, runtime, mode, frames, stride, queries, fmt, batch, progress, decode_backend,
            commit_every, on_commit,
        )  # fmt: skip


def _extract(
    out, paths, failures, runtime, mode, frames, stride, queries, fmt, batch, progress, decode_backend, commit_every,
    on_commit,
) -> dict:  # fmt: skip
    """extract_features' work, under the output folder's writer lock."""
    cfg = runtime.folder.config.video
    pipe = ClipPipeline(cfg.num_frames, cfg.img_size, decode_backend)
    settings = _settings(runtime, mode, frames, stride, queries)
    text = runtime.text_encoder.encode(queries) if mode == "fusion" else None
    names = output_names(paths, out)
    todo, skipped, notes = [], 0, []
    for path in paths:
        source = _source(path)
        work = _work(out, names[path])
        if _done(out, names[path], fmt, settings, source):
            _clear(work)  # parts of a run killed after it wrote the output
            skipped += 1
            continue
        said: list[str] = []
        try:
            windows, fps = plan_windows(
                path, cfg.num_frames, window_frames=frames, stride_frames=stride, backend=decode_backend, notes=said
            )
        except VideoReadError as exc:  # this file cannot be read: report it, do the others
            failures.append(failure_of(path, exc))
            continue
        notes += [{"path": str(path), "note": note} for note in said]  # a truncated file: used as far as it decodes
        todo.append((path, source, windows, fps, work, _resume(work, source, settings, len(windows), fps)))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(t[2]) for t in todo), unit="window", desc=f"features ({mode})", dynamic_ncols=True)
    written, windows_total, encoded, resumed, committed = 0, 0, 0, 0, 0
    t0 = time.perf_counter()
    for path, source, windows, fps, work, record in todo:
        earlier = list(record["parts"])  # committed by an earlier run
        done = record["done"]
        counted = bar.n if bar is not None else 0
        if bar is not None:
            bar.update(done)
        chunks = []  # this run's parts: {tensor name: array with the part's windows}
        try:
            # One decoding pass over the rest of the video (in a background thread), batches cut at the parts.
            batches: dict[str, list] = {}  # the current part's encoded batches
            in_part = 0
            for _, clips in pipe.batches(path, windows[done:], batch, cut_every=commit_every):
                for key, value in _encode(runtime, mode, clips, text).items():
                    batches.setdefault(key, []).append(value)
                encoded += len(clips)
                in_part += len(clips)
                if bar is not None:
                    bar.update(len(clips))
                if in_part < commit_every and done + in_part < len(windows):
                    continue
                tensors = {k: np.concatenate(v, axis=0 if mode == "dual" else 1) for k, v in batches.items()}
                done += in_part
                if done < len(windows):  # the last part goes straight into the output
                    _commit(work, record, tensors, in_part)
                    committed += in_part
                    if on_commit is not None:
                        on_commit(committed)
                chunks.append(tensors)
                batches, in_part = {}, 0
        except VideoReadError as exc:  # the committed parts stay for a rerun
            failure = failure_of(path, exc)
            if record["done"]:
                failure.reason += f" (its first {record['done']} of {len(windows)} windows are committed)"
            failures.append(failure)
            if bar is not None:
                bar.total -= len(windows) - (bar.n - counted)
                bar.refresh()
            continue
        chunks = _load_parts(work, earlier) + chunks
        if fmt == "npy" and not (work / RECORD).is_file():
            # .npy files have no header naming their source: the record claims the name (`_recorded_source`) for
            # a rerun after a kill between them and the sidecar
            _write_record(work, record)
        _finish(out, names[path], fmt, mode, chunks, windows, text, source, fps, settings)
        _clear(work)
        written += 1
        windows_total += len(windows)
        resumed += sum(p["count"] for p in earlier)
        committed += len(windows) - record["done"]
        if on_commit is not None:
            on_commit(committed)
    if bar is not None:
        bar.close()
    return {
        "out": str(out),
        "written": written,
        "skipped": skipped,
        "windows": windows_total,
        "encoded": encoded,
        "resumed": resumed,
        "mode": mode,
        "succeeded": written + skipped,
        "outputs": {str(p): names[p] for p in paths},
        "failed": failures_summary(failures),
        "notes": notes,
        "seconds": round(time.perf_counter() - t0, 2),
        "backend": runtime.summary(),
    }


def _encode(runtime: Runtime, mode: str, clips, text) -> dict[str, np.ndarray]:
    """One batch of clips -> dual `features` (b, P), or fusion `video_cls` (Q, b, Dv) and `text_tokens`
    (Q, b, L, Dt) for every query."""
    if mode == "dual":
        return {"features": runtime.video_encoder.encode(clips)}
    prefix = runtime.video_encoder.fusion_prefix(clips)  # (b, T, Dv), shared by every query
    cls, tok = [], []
    for q in range(len(text.mask)):
        c, t = _fused(runtime, prefix, text.prefix[q], text.mask[q])
        cls.append(c)
        tok.append(t)
    return {"video_cls": np.stack(cls), "text_tokens": np.stack(tok)}


def _finish(out, name, fmt, mode, chunks, windows, text, source, fps, settings) -> None:
    """Concatenate one video's parts (in window order) and write its output."""
    keys, axis = (("features",), 0) if mode == "dual" else (("video_cls", "text_tokens"), 1)
    result = {k: np.concatenate([c[k] for c in chunks], axis=axis).astype(np.float32) for k in keys if chunks}
    result["timestamps"] = np.array([[w.start_sec, w.end_sec] for w in windows], np.float64)
    if mode == "fusion":
        result["text_mask"] = text.mask.astype(np.int64)
    meta = {
        "video": source["path"],
        "source": source,
        "format": fmt,
        "fps": fps,
        "windows": len(windows),
        "settings": settings,
        "shapes": {k: list(v.shape) for k, v in result.items()},
    }
    _write(out, name, fmt, result, meta)


def _fused(runtime: Runtime, video_prefix: np.ndarray, text_prefix: np.ndarray, mask: np.ndarray):
    """The fusion head over b windows and one query -> (video_cls (b, Dv), text_tokens (b, L, Dt))."""
    runner = runtime.runner("fusion_head")
    b = len(video_prefix)
    tp = np.broadcast_to(text_prefix, (b, *text_prefix.shape))
    m = np.broadcast_to(mask, (b, mask.shape[0]))
    cls, tok = [], []
    for s in range(0, b, runtime.max_batch):
        o = runner(
            video_prefix=video_prefix[s : s + runtime.max_batch],
            text_prefix=tp[s : s + runtime.max_batch],
            attention_mask=m[s : s + runtime.max_batch],
        )
        cls.append(o["video_cls"])
        tok.append(o["text_hidden"])
    if not cls:
        raise EngineError("no windows")
    return np.concatenate(cls), np.concatenate(tok)
