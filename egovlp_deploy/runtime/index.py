"""The on-device moment index: clip embeddings + timestamps (+ fusion prefixes) of many videos, searchable by text.

Layout (safe formats only: JSON and safetensors, nothing is unpickled):

    INDEX/index.json                    the commit point: settings, the model identity, and per video its shards
    INDEX/shards/<video>-<part>.safetensors
        embeddings  (n, P) float32      dual video embeddings, L2-normalised rows
        timestamps  (n, 2) float64      [start_sec, end_sec] of each window
        video_prefix (n, T, Dv)         fusion-mode video states (only with prefixes=True; float32 or float16)

Crash safety: a shard is written under a temp name and renamed, and only then is index.json rewritten (also temp +
rename) to list it. index.json therefore only ever names complete shards; a run killed at any point leaves at most
one unlisted shard, which the next run overwrites (same name) or removes. Resuming continues each video from its
first window not yet listed, so a killed run never re-encodes committed windows and never duplicates them.

The index records its model identity (`EngineFolder.model_id`: the source checkpoint's sha256 and the model config,
as the manifest states them) and refuses engines of another model, whose embeddings would live in another space.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..jsonfile import read_json
from .engines import EngineError, Runtime
from egovlp_deploy.video import VideoReadError

from .pipeline import (ClipPipeline, StageTimes, Window, expand_inputs, failure_of, failures_summary, plan_windows,
                       segment_windows)

INDEX_FILE = "index.json"
FORMAT = "egovlp-deploy-index"
VERSION = 1
SETTINGS = ("frames", "window_sec", "stride_sec", "prefixes", "prefix_dtype", "mode")


class IndexError_(ValueError):
    """The index cannot be used as asked (unreadable, another model's, other settings)."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_json(path: Path, data: dict) -> None:
    from egovlp_deploy.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(data, indent=1).encode())


def _save_shard(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """safetensors written to a temp file, fsynced and renamed (a reader never sees half a shard)."""
    from safetensors.numpy import save

    from egovlp_deploy.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata))


def read_index_json(directory: Path) -> dict:
    path = directory / INDEX_FILE
    if not path.is_file():
        raise IndexError_(f"{directory}: not an index (no {INDEX_FILE}; build one with `egovlp-deploy index`)")
    data = read_json(path, IndexError_)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise IndexError_(f"{path}: not an egovlp-deploy index")
    if data.get("version") != VERSION:
        raise IndexError_(f"{path}: index version {data.get('version')!r}, this egovlp-deploy reads {VERSION}")
    return data


def check_model(data: dict, runtime: Runtime, where: str) -> None:
    if data["model_id"] != runtime.model_id:
        raise IndexError_(f"{where}: the index was built by another model (model hash {data['model_id']}, from "
                          f"{data.get('engines')}); the engines at {runtime.folder.path} are model {runtime.model_id}. "
                          "Their embeddings are not comparable: use the engines the index was built with, or "
                          "build a new index")


@dataclass
class IndexSettings:
    frames: int
    window_sec: float = 2.0
    stride_sec: float = 1.0
    prefixes: bool = False
    prefix_dtype: str = "float32"
    mode: str = "windows"  # "windows" (sliding) or "segments" (annotated clips)
    batch: int = 8  # windows decoded and encoded together
    commit_every: int = 32  # windows per shard: at most this many are recomputed after a kill


def build_index(out: str | os.PathLike, videos: list[str | os.PathLike], runtime: Runtime, settings: IndexSettings,
                segments: dict[str, list[tuple[float, float, str | None]]] | None = None, progress: bool = True,
                on_commit=None, decode_backend: str = "auto") -> dict:
    """Create or extend the index at `out` with `videos`; returns a summary dict.

    segments: {video path: [(start_sec, end_sec, label)]} for mode 'segments' (annotated clips instead of sliding
    windows). on_commit(n_committed_windows) is called after each commit (progress reporting, tests)."""
    out = Path(out)
    if settings.prefix_dtype not in ("float32", "float16"):
        raise ValueError(f"prefix_dtype must be float32 or float16, got {settings.prefix_dtype!r}")
    if not videos:
        raise ValueError("no videos to index")
    paths, failures = expand_inputs(videos)
    if not paths:
        raise ValueError("no video files to index: " + "; ".join(f.line() for f in failures))
    if out.exists() and not out.is_dir():
        raise IndexError_(f"{out}: exists and is not a directory")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    wanted = {k: getattr(settings, k) for k in SETTINGS}
    if (out / INDEX_FILE).exists():
        data = read_index_json(out)
        check_model(data, runtime, str(out))
        differ = {k: (data["settings"].get(k), v) for k, v in wanted.items() if data["settings"].get(k) != v}
        if differ:
            raise IndexError_(f"{out}: built with other settings {', '.join(f'{k}={a!r} (asked {b!r})' for k, (a, b) in differ.items())}; "
                              "use the same settings or another --out")
    else:
        data = {"format": FORMAT, "version": VERSION, "model_id": runtime.model_id,
                "manifest_source": runtime.folder.manifest.source_checkpoint,
                "engines": str(runtime.folder.path.resolve()),
                "backend": runtime.backend, "precision": runtime.precision, "settings": wanted,
                "embed_dim": runtime.folder.config.projection_dim, "created": _now(), "videos": []}
    _remove_unlisted_shards(out, data)
    cfg = runtime.folder.config.video
    times = StageTimes()
    pipe = ClipPipeline(settings.frames, cfg.img_size, decode_backend, times=times)
    if settings.frames != cfg.num_frames:
        raise IndexError_(f"these engines take {cfg.num_frames} frames per clip, the index asks {settings.frames}")
    by_path = {v["path"]: v for v in data["videos"]}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=0, unit="clip", desc="index", dynamic_ncols=True)
    t_start = time.perf_counter()
    new_windows = 0
    committed = sum(v["done"] for v in data["videos"])
    succeeded = 0
    for path in paths:
        entry = None
        try:
            key = str(path.resolve())
            if settings.mode == "segments":
                segs = (segments or {}).get(str(path)) or (segments or {}).get(key)
                if not segs:
                    raise VideoReadError(path, "no_segments", "no segments given for this video")
                windows, fps = segment_windows(path, segs, settings.frames, decode_backend)
            else:
                windows, fps = plan_windows(path, settings.frames, settings.window_sec, settings.stride_sec,
                                            backend=decode_backend)
            entry = by_path.get(key)
            if entry is not None and (entry["fingerprint"] != _fingerprint(path) or entry["windows"] != len(windows)):
                _drop_video(out, data, entry)  # the file changed since it was indexed: index it again
                entry = None
            if entry is None:
                entry = {"path": key, "uid": path.stem if path.stem not in ("0",) else path.parent.name,
                         "fingerprint": _fingerprint(path), "fps": fps, "windows": len(windows), "done": 0,
                         "shards": [], "labels": [w.label for w in windows] if settings.mode == "segments" else None,
                         "number": max([v["number"] for v in data["videos"]], default=-1) + 1}
                data["videos"].append(entry)
                by_path[key] = entry
            if bar is not None:
                bar.total += len(windows)
                bar.update(entry["done"])
            while entry["done"] < entry["windows"]:
                part = windows[entry["done"]: entry["done"] + settings.commit_every]
                tensors = _encode(runtime, pipe, path, part, settings)
                name = f"shards/{entry['number']:05d}-{len(entry['shards']):05d}.safetensors"
                # safetensors metadata must be UTF-8: a file name in another encoding keeps its bytes as \x escapes
                _save_shard(out / name, tensors, {"model_id": runtime.model_id,
                                                  "video": os.fsencode(key).decode("utf-8", "backslashreplace")})
                entry["shards"].append({"file": name, "start": entry["done"], "count": len(part)})
                entry["done"] += len(part)
                data["updated"] = _now()
                _write_json(out / INDEX_FILE, data)  # the commit: from here on the shard is part of the index
                new_windows += len(part)
                committed += len(part)
                if bar is not None:
                    bar.update(len(part))
                if on_commit is not None:
                    on_commit(committed)
        except VideoReadError as exc:  # this file cannot be read: report it, index the others
            failure = failure_of(path, exc)
            if entry is not None and entry["done"]:
                failure.reason += f" (indexed {entry['done']} of {entry['windows']} windows before that)"
            failures.append(failure)
            if bar is not None and entry is not None:
                bar.total -= entry["windows"] - entry["done"]
                bar.refresh()
            if entry is not None and not entry["done"]:  # nothing of it was committed: it is not in the index
                data["videos"].remove(entry)
                by_path.pop(key, None)
            continue
        succeeded += 1
        if not (out / INDEX_FILE).exists():  # a video with zero windows still registers the index
            _write_json(out / INDEX_FILE, data)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t_start
    return {"index": str(out), "videos": len(data["videos"]), "windows": sum(v["done"] for v in data["videos"]),
            "new_windows": new_windows, "seconds": round(seconds, 2), "backend": runtime.summary(),
            "preprocessing": pipe.preprocessing,
            "ms_per_clip": {s: round(times.per_item_ms(s), 2) for s in times.seconds},
            "succeeded": succeeded,
            "failed": failures_summary(failures)}


def _encode(runtime: Runtime, pipe: ClipPipeline, path: Path, windows: list[Window], s: IndexSettings) -> dict:
    emb, pre = [], []
    for i in range(0, len(windows), s.batch):
        clips = pipe.clips(path, windows[i:i + s.batch])
        t0 = time.perf_counter()
        e = runtime.video_encoder.encode(clips)
        pipe.times.add("video_encode", time.perf_counter() - t0, len(clips))
        emb.append(e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12))
        if s.prefixes:
            t0 = time.perf_counter()
            pre.append(runtime.video_encoder.fusion_prefix(clips).astype(s.prefix_dtype))
            pipe.times.add("video_prefix", time.perf_counter() - t0, len(clips))
    tensors = {"embeddings": np.concatenate(emb).astype(np.float32),
               "timestamps": np.array([[w.start_sec, w.end_sec] for w in windows], np.float64)}
    if s.prefixes:
        tensors["video_prefix"] = np.concatenate(pre)
    return tensors


def _remove_unlisted_shards(out: Path, data: dict) -> None:
    """Shards a killed run wrote but never committed, and temp files of interrupted writes."""
    listed = {s["file"] for v in data["videos"] for s in v["shards"]}
    for p in (out / "shards").iterdir():
        if f"shards/{p.name}" not in listed:
            p.unlink()


def _drop_video(out: Path, data: dict, entry: dict) -> None:
    data["videos"] = [v for v in data["videos"] if v is not entry]
    _write_json(out / INDEX_FILE, data)  # uncommit first, then delete: a crash in between leaves only orphans
    for s in entry["shards"]:
        (out / s["file"]).unlink(missing_ok=True)


# -- reading --------------------------------------------------------------------------------------------------------
@dataclass
class Hit:
    rank: int
    video: str
    uid: str
    start_sec: float
    end_sec: float
    score: float  # the final score (dual cosine, or the re-ranking score)
    dual: float  # cosine similarity of the dual embeddings
    vtm: float | None = None  # fusion match probability (re-ranked hits only)
    label: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class MomentIndex:
    """A read-only view of an index: all embeddings in memory, prefixes read on demand per hit."""

    def __init__(self, directory: str | os.PathLike):
        from safetensors.numpy import load_file

        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise IndexError_(f"{self.dir}: no such index directory")
        self.data = read_index_json(self.dir)
        emb, ts, self.rows = [], [], []  # rows: (video number in data['videos'], shard file, row in shard, window)
        for vi, v in enumerate(self.data["videos"]):
            for s in v["shards"]:
                path = self.dir / s["file"]
                try:
                    t = load_file(str(path))
                except (OSError, ValueError) as exc:  # safetensors raises SafetensorError (a ValueError subclass)
                    raise IndexError_(f"{path}: unreadable shard ({exc}); rebuild the index") from exc
                if len(t["embeddings"]) != s["count"]:
                    raise IndexError_(f"{path}: {len(t['embeddings'])} rows, index.json says {s['count']}")
                emb.append(t["embeddings"])
                ts.append(t["timestamps"])
                self.rows += [(vi, s["file"], r, s["start"] + r) for r in range(s["count"])]
        dim = self.data["embed_dim"]
        self.embeddings = np.concatenate(emb) if emb else np.zeros((0, dim), np.float32)
        self.timestamps = np.concatenate(ts) if ts else np.zeros((0, 2))
        self.has_prefixes = bool(self.data["settings"].get("prefixes"))

    def __len__(self) -> int:
        return len(self.rows)

    def label(self, row: int) -> str | None:
        vi, _, _, w = self.rows[row]
        labels = self.data["videos"][vi].get("labels")
        return labels[w] if labels else None

    def prefixes(self, rows: list[int]) -> np.ndarray:
        from safetensors import safe_open

        if not self.has_prefixes:
            raise IndexError_(f"{self.dir}: built without fusion prefixes; rebuild it with --prefixes to re-rank")
        out = []
        for r in rows:
            _, file, i, _ = self.rows[r]
            with safe_open(str(self.dir / file), framework="numpy") as f:
                out.append(f.get_slice("video_prefix")[i:i + 1])
        return np.concatenate(out).astype(np.float32)

    def hit(self, rank: int, row: int, score: float, dual: float, vtm: float | None = None) -> Hit:
        vi = self.rows[row][0]
        v = self.data["videos"][vi]
        start, end = self.timestamps[row]
        return Hit(rank, v["path"], v["uid"], float(start), float(end), float(score), float(dual),
                   None if vtm is None else float(vtm), self.label(row))

    def search(self, runtime: Runtime, query: str, top: int = 5, rerank: int = 0,
               rerank_score: str = "ensemble", text=None) -> list[Hit]:
        """Top `top` moments for `query`; with rerank=K the dual top K are re-scored by the fusion head over their
        cached prefixes. rerank_score: 'vtm' (match probability) or 'ensemble' (cosine + probability, the official
        EgoMCQ ensemble)."""
        check_model(self.data, runtime, str(self.dir))
        if rerank_score not in ("vtm", "ensemble"):
            raise ValueError(f"rerank_score must be 'vtm' or 'ensemble', got {rerank_score!r}")
        if top < 1:
            raise ValueError(f"--top must be at least 1, got {top}")
        if len(self) == 0:
            return []
        text = text or runtime.text_encoder.encode([query])
        q = text.embedding[0] / max(np.linalg.norm(text.embedding[0]), 1e-12)
        sims = self.embeddings @ q  # (N,) cosine: the rows were normalised at indexing
        k = min(len(sims), max(top, rerank))
        order = np.argsort(-sims, kind="stable")[:k]
        if rerank <= 0:
            return [self.hit(i + 1, int(r), sims[r], sims[r]) for i, r in enumerate(order[:top])]
        head = order[:rerank]
        vtm = runtime.fusion.score_prefixes(self.prefixes([int(r) for r in head]), text.prefix[:1], text.mask[:1])
        score = vtm if rerank_score == "vtm" else vtm + sims[head]
        reranked = [(int(head[j]), float(score[j]), float(vtm[j])) for j in np.argsort(-score, kind="stable")]
        rest = [(int(r), float(sims[r]), None) for r in order[rerank:]]
        return [self.hit(i + 1, r, s, sims[r], v) for i, (r, s, v) in enumerate((reranked + rest)[:top])]
