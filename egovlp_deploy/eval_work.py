"""The work of a resumable evaluation (`egovlp-deploy eval --resume-dir DIR`): a benchmark's per-item outputs
(EgoMCQ's choice scores, EK-100's and Charades-Ego's embeddings), committed in chunks of whole batches as they are
made, so that a killed run loses at most the chunk in progress and a rerun of the same run encodes only what is
missing (egovlp_deploy/evaluation.py runs the benchmarks and hands their batches to `EvalWork`).

What decides the outputs is the run's identity (`work_identity`, named by IDENTITY_LABELS): chunks are read back
only by a run equal in all of it, and a run that differs is refused before any work (`EvalWork.check`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import struct
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

WORK_FORMAT = "egovlp-deploy eval progress"
WORK_VERSION = 1
WORK_RECORD = "progress.json"
COMMIT_ITEMS = 256  # items (EgoMCQ questions, EK-100 / Charades-Ego clips) after which the batches done are committed
COMMIT_SECONDS = 60.0  # ... or seconds since the last commit, whichever comes first: at most this much is redone
_CHUNK_NAME = re.compile(r"chunk-\d{5,}\.safetensors")
_RANK_FOLDER = re.compile(r"rank(\d+)-of-(\d+)")
# The only names ever deleted in a work folder: chunks, the record, and the temp files of their atomic writes.
_WORK_NAMES = r"chunk-\d{5,}\.safetensors|progress\.json"
_WORK_OURS = re.compile(rf"{_WORK_NAMES}|\.(?:{_WORK_NAMES})\.[a-z0-9_]{{8}}\.tmp")

# What decides a benchmark's outputs, as a refusal names them: chunks are resumed only by a run equal in all.
IDENTITY_LABELS = {
    "benchmark": "benchmark",
    "egovlp_deploy": "egovlp-deploy version",
    "torch": "torch version",
    "model": "model (--model: sha256 of its weights and config, or the random preset)",
    "frames": "frames per clip (--frames)",
    "files_sha256": "annotation files (sha256)",
    "rows": "rows evaluated (the split as read: its length and the rows --lax skipped)",
    "video_root": "video folder",
    "videos": "video files (the names, sizes and modification times of those the split reads)",
    "lax": "--lax",
    "decoder": "video decoder",
    "tokenizer_sha256": "tokenizer (--tokenizer, sha256 of its files)",
    "device": "device (--device)",
    "max_questions": "--max-questions",
    "classes": "--charades-classes",
    "rank": "rank",
    "world": "world size",
}
_DIGESTS = frozenset({"model", "files_sha256", "rows", "videos", "tokenizer_sha256"})  # named, not printed


def work_identity(
    benchmark: str,
    dataset,
    files: Mapping[str, str | os.PathLike],
    *,
    model: str,
    frames: int,
    tokenizer_dir: str | os.PathLike,
    device: str | torch.device,
    lax: bool,
    max_questions: int | None = None,
    classes: int | None = None,
) -> dict:
    """What decides a benchmark's per-item outputs (IDENTITY_LABELS): the package's and torch's versions, the model
    (`model`: the sha256 of its weights and config, or the random preset), the frames, the annotation `files`
    ({label: path}, sha256), the rows read from them (lax mode skips some), the video folder and a fingerprint of the
    video files the rows read (`video_fingerprint`), --lax, the decoder, the tokenizer's files (sha256), the device
    and the benchmark's own options (EgoMCQ's `max_questions`, Charades-Ego's `classes`). Not the batch size (the
    record keeps it: `EvalWork.resume`) or the DataLoader workers, which do not change the outputs."""
    from . import __version__
    from .decoding import resolve_backend
    from .hashing import sha256_file, sha256_tree
    from .tokenizer import TOKENIZER_SUFFIXES

    count = len(dataset) if max_questions is None else min(max_questions, len(dataset))
    skipped = [row for row, _ in getattr(dataset, "skipped_rows", ())]
    rows = hashlib.sha256(json.dumps([len(dataset), skipped]).encode()).hexdigest()
    dev = torch.device(device)
    identity = {
        "benchmark": benchmark,
        "egovlp_deploy": __version__,
        "torch": torch.__version__,
        "model": model,
        "frames": frames,
        "files_sha256": {label: sha256_file(path) for label, path in files.items()},
        "rows": rows,
        "video_root": str(Path(dataset.video_root).resolve()),
        "videos": video_fingerprint(dataset.video_root, split_videos(dataset, count)),
        "lax": bool(lax),
        "decoder": resolve_backend("auto"),
        "tokenizer_sha256": sha256_tree(tokenizer_dir, suffixes=TOKENIZER_SUFFIXES),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type,
    }
    if benchmark == "egomcq":
        identity["max_questions"] = max_questions
    if benchmark == "charades":
        identity["classes"] = classes
    return identity


def split_videos(dataset, count: int) -> list[str]:
    """The distinct video files the first `count` items of an evaluation split read, relative to its video_root:
    the datasets' own `video_files()` (EK-100, Charades-Ego), or for EgoMCQ the chunk files of every choice of the
    questions scored, as `decoding.egoclip_chunk` names them (a clip reads its start's and its end's chunk)."""
    entries = getattr(dataset, "entries", None)
    if entries is None:
        return dataset.video_files()
    from .decoding import EGOCLIP_CHUNK_SEC

    chunks = set()  # (video_uid, chunk): one per chunk file, however many clips read it
    for entry in entries[:count]:
        for row in entry.choices:
            for sec in (row.start_sec, row.end_sec):
                chunks.add((row.video_uid, int(max(float(sec), 0.0) // EGOCLIP_CHUNK_SEC)))
    return sorted(f"{uid}/{chunk}.mp4" for uid, chunk in chunks)


def video_fingerprint(video_root: str | os.PathLike, names: Iterable[str]) -> dict:
    """{'files': how many, 'sha256': of their `name size mtime_ns` lines} for the video files `names` (relative to
    `video_root`): one stat per file, no byte read, so a video re-encoded, downloaded again or replaced in place
    (new size or modification time) makes another identity. A missing file is recorded as missing (lax mode scores
    it as black clips), so one that appears is a change too."""
    listing, count = hashlib.sha256(), 0
    for name in names:
        try:
            st = os.stat(os.path.join(video_root, name))
            line = f"{name}\t{st.st_size}\t{st.st_mtime_ns}\n"
        except (OSError, ValueError):  # ValueError: a NUL byte in the name
            line = f"{name}\tmissing\n"
        listing.update(line.encode("utf-8", "surrogateescape"))
        count += 1
    return {"files": count, "sha256": listing.hexdigest()}


# -- chunks -----------------------------------------------------------------------------------------------------------
class Chunk:
    """Consecutive items' outputs: `columns`, tensors whose first dimension is the item; `names`, the items' names
    (EgoMCQ's question keys) or None; the clips among them scored as the black clip (`failed`) out of `clips`."""

    def __init__(self, columns: tuple[torch.Tensor, ...], names: list[str] | None, failed: int, clips: int):
        self.columns, self.names, self.failed, self.clips = tuple(columns), names, int(failed), int(clips)

    @property
    def count(self) -> int:
        return len(self.columns[0])

    @property
    def schema(self) -> tuple[tuple[torch.dtype, tuple[int, ...]], ...]:
        """Each column's dtype and shape after the item dimension: what chunks joined by `merge` must agree on."""
        return tuple((column.dtype, tuple(column.shape[1:])) for column in self.columns)

    @classmethod
    def merge(cls, parts: list[Chunk]) -> Chunk:
        if len(parts) == 1:
            return parts[0]
        columns = tuple(torch.cat(column) for column in zip(*(p.columns for p in parts)))
        names = None if parts[0].names is None else [n for p in parts for n in p.names]
        return cls(columns, names, sum(p.failed for p in parts), sum(p.clips for p in parts))

    def file_parts(self) -> list:
        """The chunk as a safetensors file, the columns as c0, c1, ... and the names and counts in its metadata: a
        list of bytes-like parts to write (or hash) in order (`atomic_write_bytes` takes it as is, no joined copy)."""
        from safetensors.torch import save

        from .checkpoint import stable_safetensors

        meta = {"load_failures": str(self.failed), "clips": str(self.clips)}
        if self.names is not None:
            meta["names"] = json.dumps(self.names)
        # a copy each: columns that share memory (views of one tensor) are refused by safetensors
        columns = (column.detach().cpu().clone(memory_format=torch.contiguous_format) for column in self.columns)
        tensors = {f"c{i}": column for i, column in enumerate(columns)}
        return stable_safetensors(save(tensors, metadata=meta))

    @classmethod
    def from_bytes(cls, blob: bytes) -> Chunk:
        """The chunk `file_parts` wrote; ValueError for anything else (a truncated or damaged file among them)."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            (n,) = struct.unpack("<Q", blob[:8])
            meta = json.loads(blob[8 : 8 + n]).get("__metadata__") or {}
            tensors = load(blob)
            columns = tuple(tensors[f"c{i}"] for i in range(len(tensors)))
            names = json.loads(meta["names"]) if "names" in meta else None
            if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                raise ValueError("its names are not a list of strings")
            chunk = cls(columns, names, int(meta["load_failures"]), int(meta["clips"]))
        except (SafetensorError, struct.error, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise ValueError(f"not a chunk file ({type(exc).__name__}: {exc})") from None
        rows = {len(c) if c.dim() else -1 for c in columns}
        if not columns or len(rows) != 1 or -1 in rows or (names is not None and len(names) != chunk.count):
            raise ValueError("not a chunk file (its columns or names disagree on the number of items)")
        return chunk


def _read_chunk_file(path: Path, size: int) -> bytes:
    """The `size` bytes of the regular file `path`, the size its record gives; ValueError, before any byte is read,
    for a symbolic link (not followed: O_NOFOLLOW), anything but a regular file (a FIFO or device in a chunk's
    place is opened non-blocking and never read) and a file of another size."""
    info = os.lstat(path)  # FileNotFoundError: missing
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
        raise ValueError("not a regular file (a symbolic link, folder, FIFO or device is never a chunk written here)")
    nonblocking = getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | nonblocking)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # replaced by a symbolic link since the lstat
            raise ValueError("a symbolic link, not a chunk written here") from None
        raise
    with open(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size != size:
            raise ValueError(f"{info.st_size} bytes, the record says {size} (damaged, cut short or replaced)")
        if nonblocking:  # a regular file: read blocking, as network filesystems need
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~nonblocking)
        blob = f.read(size)
    if len(blob) != size:
        raise ValueError(f"{len(blob)} bytes read, the record says {size} (cut short)")
    return blob


# -- a benchmark's work folder ----------------------------------------------------------------------------------------
def _rank_world() -> tuple[int, int]:
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return (dist.get_rank() if world > 1 else 0), world


def agree(problem: str | None, world: int) -> None:
    """Raise ValueError(problem) on every rank where any rank has one (the first by rank), so that a refusal on
    one rank never leaves the others waiting in a collective; at world size 1, where there is one."""
    if world > 1:
        problems: list = [None] * world
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    if problem:
        raise ValueError(problem)


class EvalWork:
    """The committed chunks of one benchmark's per-item outputs under `eval --resume-dir DIR`: DIR/<name>/ holds
    chunk-NNNNN.safetensors (consecutive items of the split in evaluation order, whole batches, each written to a
    temp file and renamed) and progress.json (also temp + rename, the commit point), which names the run
    (`identity`, IDENTITY_LABELS), the batch size and the chunks with their item ranges, sizes, sha256 and the
    batch size each was encoded at.

    A rerun with the same identity reads back every listed chunk that is intact (a regular file of the size and
    sha256 recorded) and fits the split (its items after the chunks before it and within the split, EgoMCQ's
    question keys those of the split there, the columns' dtypes and shapes this run's), and encodes only the items
    after them: the first chunk found otherwise is encoded again, with the chunks after it. A chunk written but not
    yet listed (a kill between the two writes) and the temp files of a killed write are deleted. A record of
    another run that holds chunks is refused (`check`, ValueError) and left as it is; one without chunks (of any
    version) is started over. Only the names written here (chunks, progress.json, their temp files) are ever
    deleted; any other file stays, and so does its folder. Under torch.distributed each rank keeps its own chunks
    in DIR/<name>/rank<R>-of-<W> (`for_rank`)."""

    def __init__(self, root: str | os.PathLike, name: str, identity: dict):
        self.folder = Path(root) / name
        self.identity = identity
        self.record: dict | None = None
        self._chunks: list[Chunk] = []  # resumed and committed, in item order
        self._pending: list[Chunk] = []  # the batches not committed yet, `_pending_items` items
        self._pending_items = 0
        self._last_commit = 0.0

    def for_rank(self, rank: int, world: int) -> EvalWork:
        """The work of one rank of `world`: its own folder and identity (world size 1: this work)."""
        if world == 1:
            return self
        return EvalWork(self.folder, f"rank{rank}-of-{world}", {**self.identity, "rank": rank, "world": world})

    # -- the up-front check ---------------------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse (ValueError) what would make this benchmark's work fail or mix with another run's, naming it:
        DIR/<name> (or a rank's folder in it) that is not a folder, a record that is not ours, and a record of
        another run (another identity, or another world size) that holds chunks. Before any work, so that nothing
        is lost or mixed. Under torch.distributed every rank checks and all raise where any finds a problem."""
        _, world = _rank_world()
        try:
            problem = self._problem(world)
        except OSError as exc:
            problem = f"{self.folder}: cannot be read ({exc})"
        agree(problem, world)

    def _problem(self, world: int) -> str | None:
        if not os.path.lexists(self.folder):
            return None
        in_the_way = _not_a_folder(self.folder)
        if in_the_way:
            return in_the_way
        places = [(self.folder, 1)]  # (a folder with a record, the world size it is the work of)
        for sub in sorted(self.folder.iterdir()):
            match = _RANK_FOLDER.fullmatch(sub.name)
            if match:
                in_the_way = _not_a_folder(sub)
                if in_the_way:
                    return in_the_way
                places.append((sub, int(match.group(2))))
        for folder, there in places:
            try:
                record = _read_record(folder)
            except ValueError as exc:
                return str(exc)
            if record is None or not record.get("chunks"):
                continue
            if record.get("version") != WORK_VERSION:
                return f"{folder / WORK_RECORD}: progress of another version of egovlp-deploy; {_start_over(folder)}"
            expected = dict(self.identity)
            if there > 1:  # a rank's folder: its identity names its rank
                rank = int(_RANK_FOLDER.fullmatch(folder.name).group(1))
                expected.update(rank=rank, world=there)
            differ = _differences(record, expected)
            if there != world:
                differ.insert(0, f"world size {there} there, {world} here")
            if differ:
                return _another_run(folder, differ, self.folder)
        return None

    # -- resuming and committing ---------------------------------------------------------------------------------
    def resume(
        self,
        total: int,
        unit: str,
        desc: str,
        batch_size: int,
        names: list[str] | None = None,
        schema: tuple | None = None,
    ) -> list[Chunk]:
        """The chunks an earlier run of this identity committed that fit a split of `total` items named `names`
        (EgoMCQ's question keys; None: unnamed) with columns of `schema` (`Chunk.schema`; None: the first chunk's),
        intact and in order; starts the record (and the folder) for this run, encoded at `batch_size`."""
        record = _read_record(self.folder)
        if record is not None and record.get("chunks"):
            if record.get("version") != WORK_VERSION:
                raise ValueError(
                    f"{self.folder / WORK_RECORD}: progress of another version of egovlp-deploy; "
                    f"{_start_over(self.folder)}"
                )
            differ = _differences(record, self.identity)
            if differ:
                raise ValueError(_another_run(self.folder, differ, self.folder))
        kept: list[tuple[dict, Chunk]] = []
        if record is not None and record.get("chunks"):
            if record.get("total") != total:
                print(
                    f"note: {self.folder}: its chunks cover a split of {record.get('total')!r} {unit}, this one "
                    f"has {total}: not used, encoded again",
                    file=sys.stderr,
                )
            else:
                kept = self._intact(record["chunks"], total, names, schema)
        self.record = {
            "format": WORK_FORMAT,
            "version": WORK_VERSION,
            "run": self.identity,
            "total": total,
            "batch_size": batch_size,
            "chunks": [entry for entry, _ in kept],
        }
        self._clear(frozenset([WORK_RECORD, *(entry["file"] for entry, _ in kept)]))
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write_record()
        self._chunks = [chunk for _, chunk in kept]
        self._pending, self._pending_items, self._last_commit = [], 0, time.monotonic()
        done = self.kept_items
        if done:
            print(f"resuming: {done} of {total} {unit} already encoded ({self.folder})", file=sys.stderr)
            sizes = sorted({entry.get("batch_size") for entry, _ in kept}, key=str)
            if sizes != [batch_size]:
                # EgoMCQ pads each batch's texts to its longest, and kernels may sum in another order for another
                # batch shape: the outputs of an item can differ in their last bits with the batch it is in
                before = ", ".join(str(size) for size in sizes)
                print(
                    f"note: {desc}: the {done} {unit} kept were encoded at --batch-size {before}, the rest is encoded "
                    f"at {batch_size}: the numbers may differ in the last digits from those of an uninterrupted run "
                    "at either size (resume at the same --batch-size for exactly those of an uninterrupted run)",
                    file=sys.stderr,
                )
        return list(self._chunks)

    @property
    def kept_items(self) -> int:
        """The items committed (by an earlier run or this one)."""
        return 0 if self.record is None else sum(entry["count"] for entry in self.record["chunks"])

    def _intact(self, entries, total: int, names: list[str] | None, schema: tuple | None) -> list[tuple[dict, Chunk]]:
        """The listed chunks up to the first that is missing, damaged, out of order or does not fit the split."""
        kept, start = [], 0
        for n, entry in enumerate(entries if isinstance(entries, list) else []):
            file = entry.get("file") if isinstance(entry, dict) else None
            try:
                if not isinstance(file, str) or not _CHUNK_NAME.fullmatch(file) or entry.get("start") != start:
                    raise ValueError("not the next chunk of the record")
                size = entry.get("bytes")
                if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                    raise ValueError(f"its size in the record ({size!r}) is not a number of bytes")
                blob = _read_chunk_file(self.folder / file, size)
                if hashlib.sha256(blob).hexdigest() != entry.get("sha256"):
                    raise ValueError("its sha256 is not the one recorded (damaged or cut short)")
                chunk = Chunk.from_bytes(blob)
                if chunk.count != entry.get("count"):
                    raise ValueError(f"{chunk.count} items, the record says {entry.get('count')!r}")
                if start + chunk.count > total:
                    raise ValueError(f"items {start} to {start + chunk.count - 1}: the split has {total}")
                if names is None and chunk.names is not None:
                    raise ValueError("named items, this split's are not")
                if names is not None and chunk.names != names[start : start + chunk.count]:
                    raise ValueError("its question keys are not those of the split's items there")
                expected = schema if schema is not None else (kept[0][1].schema if kept else chunk.schema)
                if chunk.schema != expected:
                    raise ValueError(f"columns {_schema_text(chunk.schema)}, this run's are {_schema_text(expected)}")
            except (OSError, ValueError) as exc:
                why = "missing" if isinstance(exc, FileNotFoundError) else str(exc)
                after = len(entries) - n - 1
                print(
                    f"note: {self.folder / str(file)}: {why}; not used: it"
                    + (f" and the {after} chunks after it are" if after else " is")
                    + " encoded again",
                    file=sys.stderr,
                )
                break
            kept.append((entry, chunk))
            start += chunk.count
        return kept

    def add(self, chunk: Chunk) -> None:
        """A batch's outputs (the items after those added before): committed with the batches before it once they
        hold COMMIT_ITEMS items or COMMIT_SECONDS have passed since the last commit."""
        self._pending.append(chunk)
        self._pending_items += chunk.count
        if self._pending_items >= COMMIT_ITEMS or time.monotonic() - self._last_commit >= COMMIT_SECONDS:
            self._commit_pending()

    def finish(self) -> list[Chunk]:
        """Commit the batches not committed yet; every chunk of the split, in item order."""
        self._commit_pending()
        return list(self._chunks)

    def _commit_pending(self) -> None:
        if self._pending:
            self._chunks.append(self.commit(Chunk.merge(self._pending)))
        self._pending, self._pending_items, self._last_commit = [], 0, time.monotonic()

    def commit(self, chunk: Chunk) -> Chunk:
        """Write the chunk of the items after those committed, then list it in the record (the commit point)."""
        from .checkpoint import atomic_write_bytes

        assert self.record is not None, "resume() first"
        chunks = self.record["chunks"]
        name = f"chunk-{len(chunks):05d}.safetensors"
        parts = chunk.file_parts()
        atomic_write_bytes(self.folder / name, parts)
        digest, size = hashlib.sha256(), 0
        for part in parts:
            digest.update(part)
            size += memoryview(part).nbytes
        start = self.kept_items
        entry = {"file": name, "start": start, "count": chunk.count, "bytes": size, "sha256": digest.hexdigest()}
        chunks.append({**entry, "batch_size": self.record["batch_size"]})
        self._write_record()
        return chunk

    def _write_record(self) -> None:
        from .checkpoint import atomic_write_bytes

        atomic_write_bytes(self.folder / WORK_RECORD, json.dumps(self.record, indent=1).encode())

    # -- removal ------------------------------------------------------------------------------------------------
    def _clear(self, keep: frozenset[str] = frozenset(), folder: Path | None = None) -> None:
        """Delete the names written here in `folder` (default: this work's), but those in `keep`. The record
        first: a kill part way leaves chunk files that no record lists (deleted by the next run, as uncommitted
        ones), never a record that lists chunks no longer there."""
        folder = self.folder if folder is None else folder
        if _not_a_folder(folder) or not folder.is_dir():
            return
        ours = sorted(
            (p for p in folder.iterdir() if _WORK_OURS.fullmatch(p.name) and p.name not in keep),
            key=lambda p: p.name != WORK_RECORD,
        )
        for p in ours:
            if p.is_symlink() or p.is_file():
                p.unlink(missing_ok=True)  # missing_ok: another rank removing the same folder

    def remove(self) -> None:
        """Delete what was written here (chunks, the record, their temp files, those of the ranks' folders), then
        the folders this leaves empty; any other file stays, and so does its folder."""
        if _not_a_folder(self.folder) or not self.folder.is_dir():
            return
        for sub in sorted(self.folder.iterdir()):
            if _RANK_FOLDER.fullmatch(sub.name) and not _not_a_folder(sub):
                self._clear(folder=sub)
                _rmdir_if_empty(sub)
        self._clear()
        _rmdir_if_empty(self.folder)


def _read_record(folder: Path) -> dict | None:
    """The progress record in `folder`, None where there is none; ValueError for one this tool did not write. A
    record of another version is returned as it is (its caller starts it over where it lists no chunk)."""
    from .jsonfile import read_json

    path = folder / WORK_RECORD
    if not os.path.lexists(path):
        return None
    in_the_way = (
        f"{path}: is in the way of the progress record and is not one `egovlp-deploy eval` wrote; it is left as it "
        "is: move it away, or give another --resume-dir"
    )
    if path.is_symlink():
        raise ValueError(in_the_way)
    try:
        record = read_json(path, expect=dict)
    except ValueError as exc:
        raise ValueError(f"{exc}: not a progress record `egovlp-deploy eval` wrote; {_start_over(folder)}") from None
    if record.get("format") != WORK_FORMAT:
        raise ValueError(in_the_way)
    return record


def _differences(record: dict, identity: dict) -> list[str]:
    """What differs between a record's run and `identity`, as IDENTITY_LABELS name it."""
    recorded = record.get("run") if isinstance(record.get("run"), dict) else {}
    differ = []
    for key in sorted(set(recorded) | set(identity)):
        there, here = recorded.get(key), identity.get(key)
        if there != here:
            label = IDENTITY_LABELS.get(key, key)
            differ.append(f"another {label}" if key in _DIGESTS else f"{label} {there!r} there, {here!r} here")
    return differ


def _another_run(folder: Path, differ: list[str], work: Path) -> str:
    return (
        f"{folder}: the encoded chunks of another evaluation ({'; '.join(differ)}): rerun that evaluation's command "
        f"to finish it, give another --resume-dir, or delete {work} to start this one over"
    )


def _start_over(folder: Path) -> str:
    return f"delete {folder} to start this evaluation over, or give another --resume-dir"


def _not_a_folder(path: Path) -> str | None:
    """Why `path`, where a work folder goes, cannot be one (a file, or a symbolic link, which is never followed:
    the chunks are written, read and deleted only in a folder of DIR's), or None (a folder, or nothing yet)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        what = "a symbolic link"
    elif not stat.S_ISDIR(info.st_mode):
        what = "a file" if stat.S_ISREG(info.st_mode) else "not a folder"
    else:
        return None
    return (
        f"{path}: is {what}, where this evaluation keeps its work (a folder): it is left as it is: move it away, or "
        "give another --resume-dir"
    )


def _schema_text(schema: tuple) -> str:
    return "[" + ", ".join(f"{str(dtype).removeprefix('torch.')}{list(shape)}" for dtype, shape in schema) + "]"


def _rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty: files this tool did not write stay
        pass
