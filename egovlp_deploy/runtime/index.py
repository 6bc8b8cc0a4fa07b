"""The on-device moment index: clip embeddings + timestamps (+ fusion prefixes) of many videos, searchable by text.

Layout (safe formats only: JSON and safetensors, nothing is unpickled):

    INDEX/index.json                    the commit point: settings, the model identity, and per video its shards
    INDEX/shards/<video>-<part>.safetensors
        embeddings  (n, P) float32      dual video embeddings, L2-normalised rows
        timestamps  (n, 2) float64      [start_sec, end_sec] of each window
        video_prefix (n, T, Dv)         fusion-mode video states (only with prefixes=True; float32 or float16)

Crash safety: a shard is written under a temp name and renamed, and only later is index.json rewritten (also temp +
rename) to list it: once `commit_every` windows are written since the last commit (across videos, so an index of
many short videos is not rewritten per video), and at the end of the run. index.json therefore only ever names
complete shards; a run killed at any point leaves unlisted shards of fewer than `commit_every` windows, which the
next run overwrites (same names) or removes (an interrupted or failed run lists them before it stops). Resuming
continues each video from its first window not yet listed, so a killed run never re-encodes committed windows and
never duplicates them. A listed shard that is missing or unreadable (deleted, truncated, another model's) is
uncommitted by the next run, from that shard on, and those windows are encoded again (or, where the video's file is
gone, left out): rerunning `index` repairs it. index.json is compact JSON, each video's entry encoded once per
change, so a commit costs a copy of the file; videos taken out of the index (changed files, --prune) leave it at
the next commit, all together, and their shards are deleted after it.

Videos over time: a video is known by its resolved path, with its size, modification time and a content sample
(sha256 of its first and last 64 KiB). A file whose size, time or sample changed is indexed again; one indexed in
full whose size, time and sample are as recorded is not opened by the decoder again (a rerun over a large folder
reads a sample of each unchanged file, not the whole file); a new path whose
file is an indexed video whose file is gone (the same size, windows and sample) is that video moved or renamed: the
entry takes the new path and keeps its shards (each shard listed with the path it was written for). A file is also
known by its device and inode numbers (recorded in the fingerprint; an entry recorded before them takes its file's
on the next run, nothing encoded again): an index holds one entry per file, so a second path to an indexed file (a
hard link, a folder reached through two mounts) is not indexed again, in one run or a later one, and where the
indexed path is deleted while a hard link remains, the link is that video moved. A copy (another inode) is another
video. Two entries of one file in an index written before inodes were recorded are made one by the next run.

Ownership: a folder is an index only if it holds index.json in this format, written before anything else. `index`
refuses a non-empty folder without it, and in an index deletes only the files it writes itself (shard names and
the temp names of interrupted writes) that index.json does not list. Every path read from index.json stays inside
the index folder (relative, no `..`, no symlink leading out), and each shard records the model that wrote it,
which must be the index's.

The index records its model identity (`EngineFolder.model_id`: the source checkpoint's sha256 and the model config,
as the manifest states them) and refuses engines of another model, whose embeddings would live in another space.
It also records which export built it (`engines_manifest_sha256`, the sha256 of the engines' manifest.json): any
export of the same model may search it (another precision, or the same checkpoint exported again), and where the
export differs from the recorded one, `search` says so and `egovlp-deploy info INDEX` shows both hashes. Indexes
written before the hash was recorded have no such field and are read as they are. A run with another export,
backend or precision than the one recorded at the top level appends it to `other_exports`, and each shard it
writes names it (`export`: its number in `exports(data)`), so `info` and `search` say which encoded what.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from egovlp_deploy.decoding import VideoReadError

from ..checkpoint import atomic_temp_names
from ..folder_lock import exclusive_writer
from ..jsonfile import read_json
from ..path_text import printable, utf8_path
from .clip_pipeline import (
    PLANNER_VERSION,
    ClipPipeline,
    StageTimes,
    Window,
    check_seconds,
    expand_inputs,
    failure_of,
    failures_summary,
    plan_windows,
    segment_windows,
    video_uid,
)
from .engines import EngineError, Runtime

if TYPE_CHECKING:
    from collections.abc import Callable

    from .engines import TextOutput

INDEX_FILE = "index.json"
FORMAT = "egovlp-deploy-index"
VERSION = 1
SETTINGS = ("frames", "window_sec", "stride_sec", "prefixes", "prefix_dtype", "mode")
# The files `index` writes: shards/<video>-<part>.safetensors, and the temp files of atomic_write_bytes.
SHARD_NAME = re.compile(r"\d{5,}-\d{5,}\.safetensors")
SHARD_TEMP = atomic_temp_names(SHARD_NAME.pattern)
INDEX_TEMP = atomic_temp_names(r"index\.json")
REBUILD = "the index file is damaged: build the index again into a new folder"
WRITTEN_WHILE_READ = "index.json changed since this search read it (an `egovlp-deploy index` run is writing the index)"
REPAIR = "rerun the same `egovlp-deploy index` command (the same videos and --out) to encode its windows again"


class IndexFileError(ValueError):
    """The index cannot be used as asked (unreadable, another model's, other settings)."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


SAMPLE_BYTES = 1 << 16  # the bytes read from each end of a video for its content sample


def _fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, **_file_id(st)}


def _file_id(st: os.stat_result) -> dict:
    """The file's identity on its machine, {dev, inode}: what two paths to one file (hard links, a folder reached
    through two mounts) share and a copy does not; {} where the filesystem numbers no inodes."""
    return {"dev": st.st_dev, "inode": st.st_ino} if st.st_ino else {}


def _same_file(fingerprint: dict, other: dict) -> bool:
    """Whether two fingerprints (or file ids) name one file by device and inode (False where either has none)."""
    ids = [(f.get("dev"), f.get("inode")) for f in (fingerprint, other)]
    return ids[0] == ids[1] and None not in ids[0]


def _sample_sha256(path: Path) -> str:
    """sha256 of a video's size and its first and last SAMPLE_BYTES: what tells a file from another of the same
    size and modification time, and finds a moved file again, without reading whole videos on every run (a
    container's header and index, at its start or end, differ between any two recordings)."""
    import hashlib

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h = hashlib.sha256(str(size).encode() + b"\0" + f.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def _compact(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _write_json(path: Path, data: dict) -> None:
    from egovlp_deploy.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, _compact(data))


class _IndexWriter:
    """Writes a run's index.json (atomically, as one compact JSON object). Each video's entry is encoded once and
    again only after `write` is told it changed, so a commit into an index of many videos costs a copy of the
    file's bytes, not an encoding of every entry (which would grow with the index: building one would be
    quadratic)."""

    def __init__(self, path: Path, data: dict) -> None:
        self.path, self.data = path, data
        self._encoded: dict[int, tuple[dict, bytes]] = {}  # id(entry) -> (entry, its JSON); the entry held keeps
        # its id from being reused by a new entry
        self.dirty = False  # an entry changed since the last write

    def touch(self, entry: dict) -> None:
        """`entry` changed: encode it again at the next write."""
        self._encoded.pop(id(entry), None)
        self.dirty = True

    def write(self, *changed: dict) -> None:
        from egovlp_deploy.checkpoint import atomic_write_bytes

        for entry in changed:
            self._encoded.pop(id(entry), None)
        self.dirty = False
        parts = []
        for entry in self.data["videos"]:
            cached = self._encoded.get(id(entry))
            if cached is None or cached[0] is not entry:
                cached = self._encoded[id(entry)] = (entry, _compact(entry))
            parts.append(cached[1])
        head = _compact({k: v for k, v in self.data.items() if k != "videos"})
        head = head[:-1] + (b"," if len(head) > 2 else b"") + b'"videos":['
        atomic_write_bytes(self.path, head + b",".join(parts) + b"]}")


def _save_shard(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """safetensors written to a temp file, fsynced and renamed (a reader never sees half a shard)."""
    from safetensors.numpy import save

    from egovlp_deploy.checkpoint import atomic_write_bytes, stable_safetensors

    atomic_write_bytes(
        path, stable_safetensors(save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata))
    )


def shard_path(directory: Path, file: object) -> Path:
    """The path of a shard that index.json lists, confined to the index folder: a relative path without `..` that
    does not resolve (through symlinks) outside the folder. An index is a folder of files, never a pointer to
    files elsewhere."""
    where = directory / INDEX_FILE
    if not isinstance(file, str) or not file:
        raise IndexFileError(f"{where}: shard entry {file!r} is not a file name")
    rel = Path(file)
    if rel.is_absolute() or "\\" in file or ".." in rel.parts:
        raise IndexFileError(
            f"{where}: shard path {file!r} leaves the index folder; an index only reads its own "
            "shards/ (rebuild the index)"
        )
    path = directory / rel
    root = directory.resolve()
    resolved = path.resolve()
    if root not in resolved.parents:
        raise IndexFileError(
            f"{path}: resolves to {resolved}, outside the index folder; an index only reads its own "
            "shards/ (rebuild the index)"
        )
    return path


def _shard_file_of_ours(directory: Path, file) -> Path | None:
    """The path of a listed shard when it is one this module writes (shards/<video>-<part>.safetensors inside the
    folder), else None: only such files are ever deleted."""
    try:
        path = shard_path(directory, file)
    except IndexFileError:
        return None
    parts = Path(file).parts
    if len(parts) != 2 or parts[0] != "shards" or not SHARD_NAME.fullmatch(parts[1]) or path.is_symlink():
        return None
    return path


def read_shard(
    directory: Path, data: dict, video: dict, shard: dict, keys: tuple[str, ...] = (), advice: str = f"; {REPAIR}"
) -> dict:
    """The tensors `keys` of one listed shard, after checking that it is there, readable, written by the index's
    model and of the shape index.json states (keys=(): only the check, from the header). Raises IndexFileError
    naming the shard and its video, followed by `advice` (how to repair it)."""
    from safetensors import SafetensorError, safe_open

    path = shard_path(directory, shard.get("file"))
    of = f"shard of {printable(video['path'])}"
    if not path.is_file():
        raise IndexFileError(f"{path}: missing {of}{advice}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            model = metadata.get("model_id")
            if model != data["model_id"]:
                raise IndexFileError(
                    f"{path}: a {of} written by another model ({model or 'none recorded'}; the index "
                    f"is model {data['model_id']}), copied from another index?{advice}"
                )
            written_for = metadata.get("video")  # the video's path when the shard was written (it may move since)
            if written_for is not None and written_for != utf8_path(shard.get("video", video["path"])):
                raise IndexFileError(
                    f"{path}: listed as a {of} but written for {written_for} (two runs wrote this index at once, "
                    f"or the shard was copied){advice}"
                )
            names = set(f.keys())
            wanted = {"embeddings", "timestamps"} | ({"video_prefix"} if data["settings"].get("prefixes") else set())
            if not wanted <= names:
                raise IndexFileError(f"{path}: {of} lacks {', '.join(sorted(wanted - names))}{advice}")
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in wanted}
            rows = {k: v[0] if v else None for k, v in shapes.items()}
            if (
                set(rows.values()) != {shard["count"]}
                or shapes["embeddings"][1:] != (data["embed_dim"],)
                or shapes["timestamps"][1:] != (2,)
            ):
                raise IndexFileError(
                    f"{path}: {of} holds {shapes}, index.json says {shard['count']} rows of "
                    f"{data['embed_dim']} dims{advice}"
                )
            return {k: f.get_tensor(k) for k in keys}
    except (OSError, SafetensorError) as exc:  # SafetensorError is no ValueError (safetensors >= 0.5)
        raise IndexFileError(f"{path}: unreadable {of} ({exc}){advice}") from exc


def read_index_json(directory: Path) -> dict:
    path = directory / INDEX_FILE
    if not path.is_file():
        raise IndexFileError(f"{directory}: not an index (no {INDEX_FILE}; build one with `egovlp-deploy index`)")
    data = read_json(path, IndexFileError)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise IndexFileError(f"{path}: not an egovlp-deploy index")
    if data.get("version") != VERSION:
        raise IndexFileError(f"{path}: index version {data.get('version')!r}, this egovlp-deploy reads {VERSION}")
    _check_fields(path, data)
    return data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# The fields every reader of index.json uses, and the test each value passes; an optional field may be absent.
_TOP_FIELDS = {
    "model_id": lambda v: isinstance(v, str) and bool(v),
    "settings": lambda v: isinstance(v, dict),
    "embed_dim": lambda v: _is_int(v) and v > 0,
    "videos": lambda v: isinstance(v, list),
}
_VIDEO_FIELDS = {
    "path": lambda v: isinstance(v, str) and bool(v),
    "uid": lambda v: isinstance(v, str),
    "fingerprint": lambda v: isinstance(v, dict),
    "windows": _is_int,
    "done": _is_int,
    "shards": lambda v: isinstance(v, list),
    "number": _is_int,
}
_SHARD_FIELDS = {"file": lambda v: isinstance(v, str) and bool(v), "start": _is_int, "count": _is_int}
# Optional: "video", the path the shard was written for where the video has moved since.


def _check_fields(path: Path, data: dict) -> None:
    """IndexFileError naming the first field of index.json that is missing or of the wrong type (a hand-edited or
    damaged file), instead of a KeyError or TypeError deep inside a command."""

    def check(obj, fields: dict, where: str) -> None:
        if not isinstance(obj, dict):
            raise IndexFileError(f"{path}: {where} is not an object; {REBUILD}")
        for key, ok in fields.items():
            if key not in obj or not ok(obj[key]):
                shown = repr(obj.get(key))
                shown = shown if len(shown) <= 60 else shown[:57] + "..."
                raise IndexFileError(f"{path}: {where}{key} is missing or not valid ({shown}); {REBUILD}")

    check(data, _TOP_FIELDS, "")
    others = data.get("other_exports", [])
    if not isinstance(others, list) or not all(isinstance(e, dict) for e in others):
        raise IndexFileError(f"{path}: other_exports is not a list of exports; {REBUILD}")
    if not isinstance(data["settings"].get("prefixes", False), bool):
        raise IndexFileError(f"{path}: settings.prefixes is not true or false; {REBUILD}")
    for i, video in enumerate(data["videos"]):
        check(video, _VIDEO_FIELDS, f"videos[{i}].")
        for j, shard in enumerate(video["shards"]):
            check(shard, _SHARD_FIELDS, f"videos[{i}].shards[{j}].")
            if not isinstance(shard.get("video", ""), str):
                raise IndexFileError(f"{path}: videos[{i}].shards[{j}].video is not a path; {REBUILD}")
            if not (_is_int(shard.get("export", 0)) and 0 <= shard.get("export", 0) <= len(others)):
                raise IndexFileError(f"{path}: videos[{i}].shards[{j}].export names no export; {REBUILD}")
        if video["done"] != sum(shard["count"] for shard in video["shards"]) or video["done"] > video["windows"]:
            raise IndexFileError(
                f"{path}: videos[{i}] says {video['done']} of {video['windows']} windows indexed, its shards hold "
                f"{sum(shard['count'] for shard in video['shards'])}; {REBUILD}"
            )


EXPORT_FIELDS = ("engines", "engines_manifest_sha256", "backend", "precision")


def _export_of(runtime: Runtime) -> dict:
    """What encoded a run's windows: the engines folder, its export (manifest sha256), backend and precision."""
    return {
        "engines": str(runtime.folder.path.resolve()),
        "engines_manifest_sha256": runtime.folder.manifest_sha256,
        "backend": runtime.backend,
        "precision": runtime.precision,
    }


def _same_export(a: dict, b: dict) -> bool:
    """The same export run the same way (the folder may have moved); an index that did not record its export
    (no manifest sha256) is taken as any export's."""
    same_run = all(a.get(k) == b.get(k) for k in ("backend", "precision"))
    sha = a.get("engines_manifest_sha256"), b.get("engines_manifest_sha256")
    return same_run and (None in sha or sha[0] == sha[1])


def exports(data: dict) -> list[dict]:
    """The exports whose embeddings the index holds, each with `windows` (how many): the one index.json's top
    level records (which built the index first), then those that extended it (`other_exports`; a shard they wrote
    names its export's number in this list as `export`)."""
    found = [{k: data.get(k) for k in EXPORT_FIELDS}] + [dict(e) for e in data.get("other_exports", [])]
    for e in found:
        e["windows"] = 0
    for v in data["videos"]:
        for s in v["shards"]:
            found[s.get("export", 0)]["windows"] += s["count"]
    return found


def other_export(data: dict, runtime: Runtime) -> str | None:
    """A note when `runtime` runs the index's model from another export than the one that built the index, or the
    index holds the embeddings of several exports (None: one export, this one; another model; or an index that did
    not record its export)."""
    if data["model_id"] != runtime.model_id:
        return None
    used = [e for e in exports(data) if e["windows"]] or exports(data)[:1]
    if len(used) > 1:
        listed = "; ".join(
            f"{e['windows']} from {e['engines']} ({e['backend']}, {e['precision']}, manifest sha256 "
            f"{(e['engines_manifest_sha256'] or 'not recorded')[:12]})"
            for e in used
        )
        return (
            f"note: the index holds the clip embeddings of {len(used)} exports or precisions of its model ({listed}); "
            "they are comparable, scores may differ slightly"
        )
    recorded = used[0]["engines_manifest_sha256"]
    if recorded is None or recorded == runtime.folder.manifest_sha256:
        return None
    return (
        f"note: the engines at {runtime.folder.path} are another export of the index's model (manifest sha256 "
        f"{runtime.folder.manifest_sha256[:12]}, the index was built with {recorded[:12]} from "
        f"{used[0]['engines']}); the embeddings are comparable, scores may differ slightly"
    )


def check_model(data: dict, runtime: Runtime, where: str) -> None:
    if data["model_id"] != runtime.model_id:
        raise IndexFileError(
            f"{where}: the index was built by another model (model hash {data['model_id']}, from "
            f"{data.get('engines')}); the engines at {runtime.folder.path} are model {runtime.model_id}. "
            "Their embeddings are not comparable: use the engines the index was built with, or "
            "build a new index"
        )


@dataclass
class IndexSettings:
    frames: int
    window_sec: float = 2.0
    stride_sec: float = 1.0
    prefixes: bool = False
    prefix_dtype: str = "float32"
    mode: str = "windows"  # "windows" (sliding) or "segments" (annotated clips)
    batch: int = 8  # windows decoded and encoded together
    commit_every: int = 32  # windows per shard and between commits: < 2x this recomputed after a kill

    def check(self) -> None:
        """ValueError for settings no index can be built with; `build_index` calls it before it writes anything,
        so a mistyped option never leaves a folder recorded with it."""
        if self.prefix_dtype not in ("float32", "float16"):
            raise ValueError(f"prefix_dtype must be float32 or float16, got {self.prefix_dtype!r}")
        if self.mode not in ("windows", "segments"):
            raise ValueError(f"mode must be 'windows' or 'segments', got {self.mode!r}")
        for name in ("batch", "commit_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of windows >= 1, got {value!r}")
        if self.mode == "windows":
            for name in ("window_sec", "stride_sec"):
                check_seconds(getattr(self, name), name.split("_")[0])


def build_index(
    out: str | os.PathLike,
    videos: list[str | os.PathLike],
    runtime: Runtime,
    settings: IndexSettings,
    segments: dict[str, list[tuple[float, float, str | None]]] | None = None,
    progress: bool = True,
    on_commit: Callable[[int], object] | None = None,
    decode_backend: str = "auto",
    prune: bool = False,
) -> dict:
    """Create or extend the index at `out` with `videos`; returns a summary dict.

    An indexed video whose file is gone (moved, renamed or deleted) stays in the index, with a note in the
    summary; prune=True drops it (its entry and its shards).

    Every video is planned (opened, its windows listed) before any is encoded, so the progress bar counts all the
    windows of the run from the start. The summary's `ms_per_clip` is the steady state per stage: each encoder's
    first batch of the run (session creation, first allocations at the batch size) is left out, and a stage that
    ran only that batch is not listed.

    segments: {video path: [(start_sec, end_sec, label)]} for mode 'segments' (annotated clips instead of sliding
    windows). on_commit(n_committed_windows) is called after each commit (progress reporting, tests)."""
    out = Path(out)
    settings.check()
    if not videos:
        raise ValueError("no videos to index")
    paths, failures = expand_inputs(videos)
    if not paths:
        raise ValueError("no video files to index: " + "; ".join(f.line() for f in failures))
    if out.exists() and not out.is_dir():
        raise IndexFileError(f"{out}: exists and is not a directory")
    cfg = runtime.folder.config.video
    if settings.frames != cfg.num_frames:
        raise IndexFileError(f"these engines take {cfg.num_frames} frames per clip, the index asks {settings.frames}")
    runtime.check_roles("video_encoder", *(("video_fusion_prefix",) if settings.prefixes else ()))
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_writer(out, "index", IndexFileError):
        return _extend_index(
            out, paths, failures, runtime, settings, segments, progress, on_commit, decode_backend, prune
        )


def _extend_index(
    out, paths, failures, runtime, settings, segments, progress, on_commit, decode_backend, prune
) -> dict:
    """build_index's work, under the folder's writer lock: everything is read again here, after the lock is
    taken (another run may have written the folder before)."""
    cfg = runtime.folder.config.video
    wanted = {k: getattr(settings, k) for k in SETTINGS}
    fresh = not (out / INDEX_FILE).exists()
    if fresh and out.is_dir() and any(out.iterdir()):
        raise IndexFileError(
            f"{out}: not empty and not an egovlp-deploy index (no {INDEX_FILE}); nothing in it is "
            "touched. Give --out a new or empty folder, or the folder of an existing index"
        )
    if not fresh:
        data = read_index_json(out)
        check_model(data, runtime, str(out))
        differ = {k: (data["settings"].get(k), v) for k, v in wanted.items() if data["settings"].get(k) != v}
        if differ:
            settings_differ = ", ".join(f"{k}={a!r} (asked {b!r})" for k, (a, b) in differ.items())
            raise IndexFileError(
                f"{out}: built with other settings {settings_differ}; use the same settings or another --out"
            )
    else:
        data = {
            "format": FORMAT,
            "version": VERSION,
            "model_id": runtime.model_id,
            "manifest_source": runtime.folder.manifest.source_checkpoint,
            **_export_of(runtime),
            "settings": wanted,
            "embed_dim": runtime.folder.config.projection_dim,
            "planner": PLANNER_VERSION,  # the windows of its videos are planned by this version (see _extend_index)
            "created": _now(),
            "videos": [],
        }
        _write_json(out / INDEX_FILE, data)  # the marker first: from here on the folder is an index, ours to manage
    shards = out / "shards"
    if shards.is_symlink() or (shards.exists() and not shards.is_dir()):
        raise IndexFileError(
            f"{shards}: not a folder of this index (a link or a file); an index writes only inside its own folder"
        )
    shards.mkdir(exist_ok=True)
    _remove_unlisted_shards(out, data)
    times = StageTimes()
    pipe = ClipPipeline(settings.frames, cfg.img_size, decode_backend, times=times)
    writer = _IndexWriter(out / INDEX_FILE, data)
    export = _export_of(runtime)  # recorded with each shard it writes where it is not the index's first
    known = exports(data)
    export_number = next((i for i, e in enumerate(known) if _same_export(e, export)), len(known))
    pending = 0  # windows in shards written since index.json was last written
    doomed: list[dict] = []  # shards of entries taken out of the index, deleted once index.json no longer lists them

    def write(*changed: dict) -> None:
        """Rewrite index.json (`changed`: the entries edited since the last write); every shard written so far
        is complete, so it may list them all. Then delete the shards of the entries dropped since the last write."""
        nonlocal pending
        data["updated"] = _now()
        writer.write(*changed)
        pending = 0
        _delete_unlisted(out, data, doomed)
        doomed.clear()

    def drop(*entries: dict) -> None:
        """Take `entries` out of the index. Their shards go when the next write of index.json no longer lists them
        (uncommit first, then delete: a crash in between leaves only unlisted shards, which the next run removes),
        so dropping many videos (changed files, --prune) costs one rewrite of index.json, not one each."""
        ids = {id(e) for e in entries}
        data["videos"] = [v for v in data["videos"] if id(v) not in ids]
        for e in entries:
            doomed.extend(e["shards"])
        writer.dirty = True

    # the next video's shard number, past those of the entries dropped below too: their shards stay listed until
    # the next write of index.json, and a new video's shards must not take their file names before that
    number = max((v["number"] for v in data["videos"]), default=-1) + 1
    paths, indexed_under, notes = _one_entry_per_file(data, paths, drop)
    by_path = {v["path"]: v for v in data["videos"]}
    # videos planned by another version of the planner (an index written before it was recorded, too) are planned
    # again, so that its changes reach them; the index records this one's once every video went through it
    replan = data.get("planner") != PLANNER_VERSION
    unchanged = {} if replan else _unchanged(paths, indexed_under, by_path, settings)
    for path, now in list(unchanged.items()):
        entry = by_path[indexed_under.get(path) or str(path.resolve())]
        if entry["fingerprint"] != now:  # the same file, its device or inode recorded anew
            entry["fingerprint"] = now
            writer.touch(entry)
        repaired = _uncommit_broken_shards(out, data, entry, write)
        if repaired:  # windows to encode again: planned as any other video
            notes.append({"path": str(path), "note": repaired})
            del unchanged[path]
    planned, unreadable, plan_notes = _plan(
        [p for p in paths if p not in unchanged], settings, segments, decode_backend, progress
    )
    notes += plan_notes
    failures += unreadable
    gone_by_size: dict[int, list[dict]] = {}  # entries whose file is gone: a planned file may be one of them, moved
    for v in data["videos"]:
        if not os.path.lexists(v["path"]):
            gone_by_size.setdefault(v["fingerprint"].get("size"), []).append(v)
    bar = None
    if progress:
        from tqdm import tqdm

        done = sum(by_path[indexed_under.get(p) or str(p.resolve())]["done"] for p in unchanged)
        total = done + sum(len(windows) for _, windows, _ in planned)
        bar = tqdm(total=total, initial=done, unit="clip", desc="index", dynamic_ncols=True)
    t_start = time.perf_counter()
    new_windows = 0
    succeeded = len(unchanged)
    warmed: set[str] = set()  # the encoder stages that ran their first batch
    try:
        for path, windows, fps in planned:
            entry = None
            key = indexed_under.get(path) or str(path.resolve())  # another path to a file indexed under `key`: as key
            named = Path(key) if path in indexed_under else path  # the path that names the video (its uid)
            try:
                try:
                    now = {**_fingerprint(path), "sample_sha256": _sample_sha256(path)}
                except OSError as exc:
                    raise VideoReadError(path, "unreadable", str(exc)) from exc
                entry = by_path.get(key)
                if entry is not None and _changed(entry, now, windows, settings):
                    drop(entry)  # the file changed since it was indexed: index it again
                    entry = None
                elif entry is not None and entry["fingerprint"] != now:  # recorded before the sample was
                    entry["fingerprint"] = now
                    writer.touch(entry)
                if entry is None:
                    entry = _moved_here(gone_by_size, now, windows, settings)
                    if entry is not None:
                        notes.append({"path": str(path), "note": f"moved from {entry['path']}: its moments are kept"})
                        by_path.pop(entry["path"], None)
                        for s in entry["shards"]:
                            s.setdefault("video", entry["path"])  # the path its shard was written for
                        entry.update(path=key, uid=video_uid(named), fingerprint=now)
                        by_path[key] = entry
                        write(entry)
                if entry is not None:
                    repaired = _uncommit_broken_shards(out, data, entry, write)
                    if repaired:
                        notes.append({"path": str(path), "note": repaired})
                if entry is None:
                    entry = {
                        "path": key,
                        "uid": video_uid(named),
                        "fingerprint": now,
                        "fps": fps,
                        "windows": len(windows),
                        "done": 0,
                        "shards": [],
                        "labels": [w.label for w in windows] if settings.mode == "segments" else None,
                        "number": number,
                    }
                    number += 1
                    data["videos"].append(entry)
                    by_path[key] = entry
                if bar is not None:
                    bar.update(entry["done"])
                for part, tensors in _encoded_parts(runtime, pipe, path, windows[entry["done"] :], settings, warmed):
                    name = f"shards/{entry['number']:05d}-{len(entry['shards']):05d}.safetensors"
                    _save_shard(out / name, tensors, {"model_id": runtime.model_id, "video": utf8_path(key)})
                    shard = {"file": name, "start": entry["done"], "count": len(part)}
                    if export_number:
                        if export_number > len(data.get("other_exports", [])):
                            data.setdefault("other_exports", []).append(export)
                        shard["export"] = export_number
                    entry["shards"].append(shard)
                    entry["done"] += len(part)
                    writer.touch(entry)
                    new_windows += len(part)
                    pending += len(part)
                    if pending >= settings.commit_every:  # the commit: from here on the shards are part of the index
                        write()
                        if on_commit is not None:
                            on_commit(sum(v["done"] for v in data["videos"]))
                    if bar is not None:
                        bar.update(len(part))
            except VideoReadError as exc:  # this file cannot be read: report it, index the others
                failure = failure_of(path, exc)
                if entry is not None and entry["done"]:
                    failure.reason += f" (indexed {entry['done']} of {entry['windows']} windows before that)"
                failures.append(failure)
                if bar is not None:
                    bar.total -= len(windows) - (entry["done"] if entry is not None else 0)
                    bar.refresh()
                if entry is not None and not entry["done"]:  # no window of it indexed: it leaves the index
                    data["videos"].remove(entry)
                    by_path.pop(key, None)
                    writer.dirty = True
                continue
            succeeded += 1
    except BaseException:  # interrupted (Ctrl-C, SIGTERM) or failed: list the complete shards written so far
        if pending:
            with contextlib.suppress(Exception):  # the error being raised is the one to report
                write()
        raise
    if pending or writer.dirty:
        write()
        if pending and on_commit is not None:
            on_commit(sum(v["done"] for v in data["videos"]))
    if bar is not None:
        bar.close()
    gone = [v for v in data["videos"] if not os.path.lexists(v["path"])]
    if prune:
        drop(*gone)
        note = "pruned: the file is gone, its moments are no longer in the index"
        notes += [{"path": video["path"], "note": note} for video in gone]
    else:
        note = (
            "indexed, but the file is gone (moved, renamed or deleted): search still finds its moments; "
            "`egovlp-deploy index --prune` drops them"
        )
        for video in gone:  # only uncommitted (nothing is written under their names): one write for all of them
            lost = _uncommit_broken_shards(out, data, video, writer.touch, gone=True)
            notes.append({"path": video["path"], "note": f"{note}; {lost}" if lost else note})
    if replan:
        data["planner"] = PLANNER_VERSION
        writer.dirty = True
    if writer.dirty:
        write()
    seconds = time.perf_counter() - t_start
    return {
        "index": str(out),
        "videos": len(data["videos"]),
        "pruned": len(gone) if prune else 0,
        "windows": sum(v["done"] for v in data["videos"]),
        "new_windows": new_windows,
        "seconds": round(seconds, 2),
        "backend": runtime.summary(),
        "preprocessing": pipe.preprocessing,
        "ms_per_clip": {s: round(times.per_item_ms(s), 2) for s in times.seconds},
        "succeeded": succeeded,
        "notes": notes,
        "failed": failures_summary(failures),
    }


def _plan(
    paths: list[Path], settings: IndexSettings, segments: dict | None, decode_backend: str, progress: bool
) -> tuple[list[tuple[Path, list[Window], float]], list, list[dict]]:
    """(path, windows, fps) of every video that opens, the failures of those that do not, and notes on those that
    open only partly ({path, note}: a truncated file is indexed as far as it decodes)."""
    planned, failures, notes = [], [], []
    if progress:
        from tqdm import tqdm

        paths = tqdm(paths, unit="video", desc="plan", dynamic_ncols=True, leave=False)
    for path in paths:
        said: list[str] = []
        try:
            if settings.mode == "segments":
                segs = (segments or {}).get(str(path)) or (segments or {}).get(str(path.resolve()))
                if not segs:
                    raise VideoReadError(path, "no_segments", "no segments given for this video")
                windows, fps = segment_windows(
                    path, segs, settings.frames, decode_backend, notes=said, skip_outside=True
                )
            else:
                windows, fps = plan_windows(
                    path, settings.frames, settings.window_sec, settings.stride_sec, backend=decode_backend, notes=said
                )
        except VideoReadError as exc:  # this file cannot be read: report it, index the others
            failures.append(failure_of(path, exc))
            continue
        planned.append((path, windows, fps))
        notes += [{"path": str(path), "note": note} for note in said]
    return planned, failures, notes


def _timed(pipe: ClipPipeline, warmed: set[str], stage: str, call, clips: np.ndarray) -> np.ndarray:
    """call(clips), its time per clip added to the stage's steady state unless it is the stage's first call of the
    run: that one creates the session and allocates at the batch size (warm-up, not throughput)."""
    t0 = time.perf_counter()
    out = call(clips)
    if stage in warmed:
        pipe.times.add(stage, time.perf_counter() - t0, len(clips))
    warmed.add(stage)
    return out


def _encoded_parts(
    runtime: Runtime, pipe: ClipPipeline, path: Path, windows: list[Window], s: IndexSettings, warmed: set[str]
):
    """(windows of a part, its shard tensors) for consecutive parts of `commit_every` windows: one decoding pass
    over the file (`ClipPipeline.batches`: decoded in a background thread while the engines encode), batches of
    `s.batch` cut at the parts."""
    emb, pre, first = [], [], 0
    for start, clips in pipe.batches(path, windows, s.batch, cut_every=s.commit_every):
        e = _timed(pipe, warmed, "video_encode", runtime.video_encoder.encode, clips)
        emb.append(e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12))
        if s.prefixes:
            prefix = _timed(pipe, warmed, "video_prefix", runtime.video_encoder.fusion_prefix, clips)
            pre.append(prefix.astype(s.prefix_dtype))
        end = start + len(clips)
        if end - first < s.commit_every and end < len(windows):
            continue
        part = windows[first:end]
        tensors = {
            "embeddings": np.concatenate(emb).astype(np.float32),
            "timestamps": np.array([[w.start_sec, w.end_sec] for w in part], np.float64),
        }
        if s.prefixes:
            tensors["video_prefix"] = np.concatenate(pre)
        yield part, tensors
        emb, pre, first = [], [], end


def _remove_unlisted_shards(out: Path, data: dict) -> None:
    """Shards a killed run wrote but never committed, and temp files of interrupted writes: only files named as
    this module names them and not listed in index.json; anything else in the folder stays."""
    listed = {s.get("file") for v in data["videos"] for s in v["shards"]}
    for folder, names in ((out / "shards", (SHARD_NAME, SHARD_TEMP)), (out, (INDEX_TEMP,))):
        for p in folder.iterdir():
            if (
                any(n.fullmatch(p.name) for n in names)
                and f"shards/{p.name}" not in listed
                and p.is_file()
                and not p.is_symlink()
            ):
                p.unlink()


def _uncommit_broken_shards(out: Path, data: dict, entry: dict, write, gone: bool = False) -> str | None:
    """Uncommit a video's shards from its first missing, unreadable or damaged one on (`write(entry)` rewrites
    index.json first; the run then encodes those windows again under the same names); a note saying so, or None when
    all are sound. Windows are committed in order, so the video resumes from the broken shard's first window.
    gone=True: the video's file is gone, so its windows cannot be encoded again; they leave the index, the sound
    ones before them stay searchable. Embeddings and timestamps are checked as search checks them; fusion prefixes,
    the bulk of the bytes, when a hit reads them."""
    for i, s in enumerate(entry["shards"]):
        try:
            tensors = read_shard(out, data, entry, s, ("embeddings", "timestamps"), advice="")
            _check_shard_values(out, entry, s, tensors, advice="")
        except IndexFileError as exc:
            entry["shards"] = entry["shards"][:i]
            entry["done"] = sum(k["count"] for k in entry["shards"])
            write(entry)
            if gone:
                return (
                    f"its windows {entry['done']}-{entry['windows'] - 1} are taken out of the index, since the file "
                    f"is not there to encode them again ({exc})"
                )
            return f"encoding windows {entry['done']}-{entry['windows'] - 1} again ({exc})"
    return None


def _changed(entry: dict, now: dict, windows: list[Window], settings: IndexSettings) -> bool:
    """Whether the file of an indexed video is no longer the one indexed: another size, modification time or
    content sample (recorded since the sample was; an entry without it is taken on size and time), or other
    windows."""
    recorded = entry["fingerprint"]
    return (
        any(recorded.get(k) != now[k] for k in ("size", "mtime_ns"))
        or recorded.get("sample_sha256", now["sample_sha256"]) != now["sample_sha256"]
        or not _same_windows(entry, windows, settings)
    )


def _same_windows(entry: dict, windows: list[Window], settings: IndexSettings) -> bool:
    return entry["windows"] == len(windows) and (
        settings.mode != "segments" or entry.get("labels") == [w.label for w in windows]
    )


def _moved_here(gone_by_size: dict[int, list[dict]], now: dict, windows: list[Window], settings) -> dict | None:
    """The indexed video whose file is gone and which this file is, moved or renamed (or copied, and the original
    deleted, or a hard link whose other path was deleted): the same size, windows and content sample (for entries
    recorded before the sample was: the same modification time, which a move keeps), and of those first the one
    recorded with this file's device and inode; taken out of `gone_by_size`. None: no such video."""
    candidates = gone_by_size.get(now["size"], [])
    for entry in sorted(candidates, key=lambda e: not _same_file(e["fingerprint"], now)):
        recorded = entry["fingerprint"]
        same = (
            recorded["sample_sha256"] == now["sample_sha256"]
            if "sample_sha256" in recorded
            else recorded.get("mtime_ns") == now["mtime_ns"]
        )
        if same and _same_windows(entry, windows, settings):
            gone_by_size[now["size"]].remove(entry)
            return entry
    return None


def _one_entry_per_file(data: dict, paths: list[Path], drop) -> tuple[list[Path], dict[Path, str], list[dict]]:
    """One entry per file, told by device and inode: the paths of the run with one path per file, the paths to be
    indexed under another ({path given: the path its file is indexed under}), and notes.

    A file already indexed stays under its indexed path, whichever path to it the run names (a hard link, the
    folder through another mount): a change to it is indexed again under that path. A file reached by several
    paths of the run and not indexed yet is indexed under the first. Two entries of one file (an index written
    before inodes were recorded) become one: the entry whose fingerprint matches the file (then the one with more
    windows indexed, then the first) stays, the other is dropped (`drop(entry)`)."""
    notes: list[dict] = []
    indexed: dict[tuple[int, int], dict] = {}  # (dev, inode) of the file at an indexed path that is there -> entry
    for entry in list(data["videos"]):
        try:
            st = os.stat(entry["path"])
        except OSError:  # gone (or unreadable): the moved-video logic and the end of the run see to it
            continue
        fid = _file_id(st)
        if not fid:
            continue
        kept = indexed.setdefault((fid["dev"], fid["inode"]), entry)
        if kept is entry:
            continue

        def rank(e: dict, st=st) -> tuple[bool, int]:
            fp = e["fingerprint"]
            return (fp.get("size"), fp.get("mtime_ns")) == (st.st_size, st.st_mtime_ns), e["done"]

        if rank(entry) > rank(kept):
            kept, entry = entry, kept
            indexed[(fid["dev"], fid["inode"])] = kept
        drop(entry)
        notes.append(
            {
                "path": entry["path"],
                "note": f"the same file as {printable(kept['path'])} (a hard link or another path to it): "
                "its second entry is taken out of the index, its moments stay under that path",
            }
        )
    groups: dict[tuple[int, int], list[tuple[Path, str]]] = {}  # the run's paths to each file, in order
    order: list = []  # the run's paths, one file's paths at its first one's place
    for path in paths:
        try:
            fid = _file_id(path.stat())
        except OSError:  # planning reports it
            fid = {}
        if not fid:
            order.append(path)
            continue
        fid = (fid["dev"], fid["inode"])
        if fid not in groups:
            order.append(fid)
        groups.setdefault(fid, []).append((path, str(path.resolve())))
    kept_paths, under = [], {}
    for item in order:
        if isinstance(item, Path):
            kept_paths.append(item)
            continue
        group = groups[item]
        entry = indexed.get(item)
        key = entry["path"] if entry is not None else group[0][1]
        chosen = next((p for p, k in group if k == key), group[0][0])
        kept_paths.append(chosen)
        for p, k in group:
            if k != key:
                notes.append(
                    {
                        "path": str(p),
                        "note": f"the same file as {printable(key)} (a hard link or another path to it), indexed "
                        "under that path: not indexed again",
                    }
                )
        if str(chosen.resolve()) != key:
            under[chosen] = key
    return kept_paths, under, notes


def _delete_unlisted(out: Path, data: dict, shards: list[dict]) -> None:
    """Delete the files of `shards` (of entries taken out of the index) that index.json as written lists no more;
    a path elsewhere, or a name not ours, is left alone."""
    if not shards:
        return
    listed = {s.get("file") for v in data["videos"] for s in v["shards"]}
    for s in shards:
        path = _shard_file_of_ours(out, s.get("file")) if s.get("file") not in listed else None
        if path is not None:
            path.unlink(missing_ok=True)


def _unchanged(
    paths: list[Path], indexed_under: dict[Path, str], by_path: dict[str, dict], settings: IndexSettings
) -> dict[Path, dict]:
    """{path: its fingerprint now} of the run's paths whose video is indexed in full from this very file: the
    recorded size, modification time and content sample. Such a video's windows are the ones indexed, so it is not
    planned again (planning reads the whole file to list its frames): a rerun over a large folder reads only the
    files that changed, and a content sample of the others. In segments mode every video is planned (the segments
    given may change between runs); so is an entry recorded before the content sample was."""
    found: dict[Path, dict] = {}
    if settings.mode != "windows":
        return found
    for path in paths:
        entry = by_path.get(indexed_under.get(path) or str(path.resolve()))
        if entry is None or entry["done"] != entry["windows"] or "sample_sha256" not in entry["fingerprint"]:
            continue
        try:
            now = {**_fingerprint(path), "sample_sha256": _sample_sha256(path)}
        except OSError:  # planning reports it
            continue
        if all(entry["fingerprint"].get(k) == now[k] for k in ("size", "mtime_ns", "sample_sha256")):
            found[path] = now
    return found


# -- reading --------------------------------------------------------------------------------------------------------
def display_names(paths: list[str]) -> dict[str, str]:
    """A name per indexed video for listings: its path relative to the folder all the videos share, so that
    a/bikes.mp4 and b/bikes.mp4 stay apart; the full path where they share nothing but the filesystem root (or
    lie on different drives). A chunk of the EgoClip layout (ROOT/<uid>/0.mp4) keeps its folder, which names it:
    one video ROOT/vid_a/0.mp4 is `vid_a/0.mp4`, not `0.mp4`."""
    try:
        common = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    except ValueError:  # different drives, or absolute and relative paths mixed
        common = ""
    if common and any(os.path.dirname(p) == common and Path(p).stem.isdigit() for p in paths):
        common = os.path.dirname(common)
    if not common or os.path.dirname(common) == common:
        return {p: p for p in paths}
    return {p: os.path.relpath(p, common) for p in paths}


@dataclass
class Hit:
    rank: int
    video: str
    uid: str
    name: str  # the video's path relative to the indexed videos' common folder (`display_names`)
    start_sec: float
    end_sec: float
    score: float  # the final score (dual cosine, or the re-ranking score)
    dual: float  # cosine similarity of the dual embeddings
    vtm: float | None = None  # fusion match probability (re-ranked hits only)
    label: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _damaged(directory: Path, video: dict, shard: dict, what: str, advice: str | None = None) -> IndexFileError:
    """The error for a shard whose values no index run writes (a damaged or hand-edited file): the next run of the
    same `index` command encodes its windows again (`advice`: what to tell the user; default: that)."""
    path = shard_path(directory, shard["file"])
    return IndexFileError(
        f"{path}: shard of {printable(video['path'])} holds {what}, which no index run writes (a damaged or "
        f"edited file){f'; {REPAIR}' if advice is None else advice}"
    )


def _check_shard_values(
    directory: Path, video: dict, shard: dict, tensors: dict[str, np.ndarray], advice: str | None = None
) -> None:
    """Embeddings finite and L2-normalised (search ranks by their dot product with the query, which is a cosine only
    for unit rows; an all-zero row scores 0), timestamps finite with start <= end."""
    emb, ts = tensors["embeddings"], tensors["timestamps"]
    for name, x in (("embeddings", emb), ("timestamps", ts)):
        if not np.issubdtype(x.dtype, np.floating):
            raise _damaged(directory, video, shard, f"{name} of dtype {x.dtype}", advice)
        if not np.isfinite(x).all():
            raise _damaged(directory, video, shard, f"NaN or infinite {name}", advice)
    norms = np.linalg.norm(emb.astype(np.float64), axis=1)
    bad = ~((np.abs(norms - 1) <= 1e-3) | (norms == 0))
    if bad.any():
        what = f"embeddings of norm {norms[bad][0]:.6g} (they are unit vectors)"
        raise _damaged(directory, video, shard, what, advice)
    if (ts[:, 1] < ts[:, 0]).any():
        raise _damaged(directory, video, shard, "a window that ends before it starts", advice)


def _check_labels(directory: Path, number: int, video: dict) -> None:
    """A video's labels (segments mode): absent or null, or one text (or null) per window."""
    labels = video.get("labels")
    if labels is None:
        return
    if (
        not isinstance(labels, list)
        or len(labels) != video["windows"]
        or not all(x is None or isinstance(x, str) for x in labels)
    ):
        raise IndexFileError(
            f"{directory / INDEX_FILE}: videos[{number}].labels is not a list of {video['windows']} texts; {REBUILD}"
        )


class MomentIndex:
    """A read-only view of an index: all embeddings in memory, prefixes read on demand per hit."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise IndexFileError(f"{self.dir}: no such index directory")
        # An `index` run may commit between the read of index.json and the reads of the shards it lists (and delete
        # or rewrite those it no longer lists): a shard that fails to read while index.json changed is read again
        # from the new index.json, once; a shard that fails while index.json stays the same is a damaged index.
        for attempt in range(2):
            self.data = read_index_json(self.dir)
            try:
                self._load()
                return
            except IndexFileError as exc:
                if not self._written_since_read():
                    raise
                if attempt:
                    again = "search again when that run is done"
                    raise IndexFileError(f"{self.dir}: {WRITTEN_WHILE_READ}; {again}") from exc

    def _written_since_read(self) -> bool:
        """Whether index.json differs from the one this view read (an `index` run committed since)."""
        try:
            return read_index_json(self.dir) != self.data
        except IndexFileError:
            return True

    def _stale(self, path: Path, why: object) -> IndexFileError:
        """The error for a shard read after an `index` run changed it since this view read the index (deleted, or
        written again under its name, for another video after `--prune`): this view's rows no longer name its
        clips, and a view never reads an index again by itself. An index deleted or moved away says so."""
        if not (self.dir / INDEX_FILE).is_file():
            return IndexFileError(f"{self.dir}: the index is gone (deleted or moved since this search read it)")
        return IndexFileError(
            f"{path}: the index changed since this search read it (an `egovlp-deploy index` run wrote it); open the "
            f"index again (a new MomentIndex) and search again ({why})"
        )

    def _load(self) -> None:
        """All embeddings and timestamps, read shard by shard into arrays of the size index.json states (read_shard
        checks each shard's rows against it): the peak memory is the index's embeddings and one shard, not twice
        the embeddings (a list of shards, then their concatenation)."""
        self.rows = []  # (video number in data['videos'], shard file, row in shard, window)
        total = sum(s["count"] for v in self.data["videos"] for s in v["shards"])
        try:
            self.embeddings = np.empty((total, self.data["embed_dim"]), np.float32)
            self.timestamps = np.empty((total, 2), np.float64)
        except MemoryError:  # sized from index.json before any shard is read: a damaged count asks for terabytes
            raise IndexFileError(
                f"{self.dir / INDEX_FILE}: lists {total} clips of {self.data['embed_dim']} values, more than this "
                f"machine's memory holds (a damaged or hand-edited index.json?; {REPAIR})"
            ) from None
        for vi, v in enumerate(self.data["videos"]):
            _check_labels(self.dir, vi, v)
            for s in v["shards"]:
                t = read_shard(self.dir, self.data, v, s, ("embeddings", "timestamps"))
                _check_shard_values(self.dir, v, s, t)
                at = len(self.rows)
                self.embeddings[at : at + s["count"]] = t["embeddings"]
                self.timestamps[at : at + s["count"]] = t["timestamps"]
                self.rows += [(vi, s["file"], r, s["start"] + r) for r in range(s["count"])]
        self.has_prefixes = bool(self.data["settings"].get("prefixes"))
        self.names = display_names([v["path"] for v in self.data["videos"]])

    def __len__(self) -> int:
        return len(self.rows)

    def label(self, row: int) -> str | None:
        vi, _, _, w = self.rows[row]
        labels = self.data["videos"][vi].get("labels")
        return labels[w] if labels else None

    def prefixes(self, rows: list[int]) -> np.ndarray:
        from safetensors import SafetensorError, safe_open

        if not self.has_prefixes:
            raise IndexFileError(f"{self.dir}: built without fusion prefixes; rebuild it with --prefixes to re-rank")
        out = []
        for r in rows:
            _, file, i, _ = self.rows[r]
            path = shard_path(self.dir, file)
            try:  # checked at load; read again here, so a shard changed since then is reported, not a crash
                with safe_open(str(path), framework="numpy") as f:
                    # the row's embedding, read from the same open file, tells whether this is still the clip this
                    # view loaded: a later run may have written another video's shard under the name
                    same = np.array_equal(
                        f.get_slice("embeddings")[i : i + 1].astype(np.float32), self.embeddings[r : r + 1]
                    )
                    out.append(f.get_slice("video_prefix")[i : i + 1])
            except (OSError, SafetensorError) as exc:
                if self._written_since_read():
                    raise self._stale(path, exc) from exc
                raise IndexFileError(f"{path}: unreadable shard ({exc}); {REPAIR}") from exc
            if not same:
                if self._written_since_read():
                    raise self._stale(path, "another clip's embedding in its row")
                vi = self.rows[r][0]
                shard = next(s for s in self.data["videos"][vi]["shards"] if s["file"] == file)
                what = "another embedding than when this index was read"
                raise _damaged(self.dir, self.data["videos"][vi], shard, what, f"; delete it and {REPAIR}")
            if not np.issubdtype(out[-1].dtype, np.floating) or not np.isfinite(out[-1]).all():
                vi = self.rows[r][0]
                shard = next(s for s in self.data["videos"][vi]["shards"] if s["file"] == file)
                what = "a NaN, infinite or non-float video prefix"
                raise _damaged(self.dir, self.data["videos"][vi], shard, what, f"; delete it and {REPAIR}")
        return np.concatenate(out).astype(np.float32)

    def scores(self, query: np.ndarray) -> np.ndarray:
        """(N,) float32 cosine of each clip with a unit `query` vector (the rows are unit vectors, checked at
        load). Each row's dot product is summed the same way wherever the row lies: a BLAS matrix-vector product
        sums rows in blocks whose arithmetic depends on the row's position, so identical clips would differ in
        their last bits and rank by where they lie instead of in index order."""
        q = np.ascontiguousarray(query, np.float32)
        return np.einsum("ij,j->i", self.embeddings, q)

    def changed_since_indexed(self, paths: list[str]) -> list[str]:
        """Those of the indexed videos at `paths` whose file is gone or no longer the size and modification time it
        was indexed with (`_fingerprint`, one stat each): their moments are the indexed file's, not what the path
        holds now."""
        recorded = {v["path"]: v["fingerprint"] for v in self.data["videos"]}
        changed = []
        for path in dict.fromkeys(paths):
            try:
                now = _fingerprint(Path(path))
            except OSError:
                changed.append(path)
                continue
            if any(recorded.get(path, {}).get(k) != now[k] for k in ("size", "mtime_ns")):
                changed.append(path)
        return changed

    def hit(self, rank: int, row: int, score: float, dual: float, vtm: float | None = None) -> Hit:
        vi = self.rows[row][0]
        v = self.data["videos"][vi]
        start, end = self.timestamps[row]
        return Hit(
            rank,
            v["path"],
            v["uid"],
            self.names[v["path"]],
            float(start),
            float(end),
            float(score),
            float(dual),
            None if vtm is None else float(vtm),
            self.label(row),
        )

    def search(
        self,
        runtime: Runtime,
        query: str,
        top: int = 5,
        rerank: int = 0,
        rerank_score: str = "ensemble",
        text: TextOutput | None = None,
    ) -> list[Hit]:
        """Top `top` moments for `query`; with rerank=K the dual top K are re-scored by the fusion head over their
        cached prefixes. rerank_score: 'vtm' (match probability) or 'ensemble' (cosine + probability, the official
        EgoMCQ ensemble). Moments of equal score rank in index order (the order index.json lists the videos, then
        time): identical clips (copies of a video, still frames) score exactly alike wherever they lie in the
        index, and a clip's score does not depend on how many others the index holds (`scores`)."""
        check_model(self.data, runtime, str(self.dir))
        if rerank_score not in ("vtm", "ensemble"):
            raise ValueError(f"rerank_score must be 'vtm' or 'ensemble', got {rerank_score!r}")
        top, rerank = _count(top, "--top", 1), _count(rerank, "--rerank", 0)
        if rerank and not self.has_prefixes:
            raise IndexFileError(f"{self.dir}: built without fusion prefixes; rebuild it with --prefixes to re-rank")
        if len(self) == 0:
            return []
        text = text or runtime.text_encoder.encode([query])
        if not np.isfinite(text.embedding[0]).all():
            raise EngineError(f"the text encoder returned NaN or infinite values for {query!r}")
        q = text.embedding[0] / max(np.linalg.norm(text.embedding[0]), 1e-12)
        sims = self.scores(q)
        order = _top_rows(sims, max(top, rerank))
        if rerank <= 0:
            return [self.hit(i + 1, int(r), sims[r], sims[r]) for i, r in enumerate(order[:top])]
        head = order[:rerank]
        vtm = runtime.fusion.score_prefixes(self.prefixes([int(r) for r in head]), text.prefix[:1], text.mask[:1])
        if not np.isfinite(vtm).all():
            raise EngineError(f"the fusion head returned NaN or infinite match scores for {query!r}")
        score = vtm if rerank_score == "vtm" else vtm + sims[head]
        reranked = [(int(head[j]), float(score[j]), float(vtm[j])) for j in np.argsort(-score, kind="stable")]
        rest = [(int(r), float(sims[r]), None) for r in order[rerank:]]
        return [self.hit(i + 1, r, s, sims[r], v) for i, (r, s, v) in enumerate((reranked + rest)[:top])]


def _top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """The rows of the `k` highest scores, best first, equal scores in row order: what a stable sort of the whole
    array gives, in O(N) for k much smaller than N (the rows scoring at least the k-th best are sorted, not all)."""
    k = min(len(scores), k)
    if k >= len(scores) // 2:
        return np.argsort(-scores, kind="stable")[:k]
    kth = np.partition(scores, len(scores) - k)[len(scores) - k]  # the k-th highest score
    rows = np.flatnonzero(scores >= kth)  # k rows, or more where others tie with the k-th
    return rows[np.argsort(-scores[rows], kind="stable")][:k]


def _count(value, name: str, least: int) -> int:
    """An integer option of `search` (Python ints and numpy integers; not bool or float), at least `least`."""
    import operator

    if isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if value < least:
        raise ValueError(f"{name} must be {'at least 1' if least else '0 (off) or more'}, got {value}")
    return value
