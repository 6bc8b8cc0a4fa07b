"""The journal of an unfinished export: what a rerun into the same folder keeps.

`export-incomplete.json` marks a folder whose export has not finished (the runtime refuses such a folder). Beside the
tokenizer files the run may replace, it records the run's identity and every step finished so far: an artifact (its
manifest entry and its validation against torch) or a task check (its verdict). A rerun with the same identity keeps
each finished step whose files are still the ones the earlier run wrote there (the same inode and change time, so a
folder copied or handed over from elsewhere keeps nothing) and have the size and sha256 recorded; it does only the
rest: a paper-size export takes tens of minutes on a CPU, its AOTInductor packages longer. A rerun with another
identity starts over. A record whose fields are not what this run would write is not trusted either.

The identity covers what decides an artifact's bytes and its verdict: the checkpoint (its sha256, or the random
preset), the model config (frames included), the export settings that are not a choice of steps (shapes, opset,
attention route, device, TensorRT and AOTInductor options), the CPU's instruction set (ORT-optimized graphs and
AOTInductor CPU packages are built for it), the tool versions and the source of the exporter, model, kernels and data
readers themselves (an editable install changes code without changing its version). Steps built for a GPU (TensorRT
engines, CUDA packages) also record the GPU. Which formats, precisions
and roles are asked for is no part of it: each names its own steps. A task check also records the digest of the
questions it ran on (`task_inputs`).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import asdict, fields
from pathlib import Path

from .manifest import INCOMPLETE, MANIFEST, ArtifactEntry, ArtifactError, ManifestError, check_file, inside
from .validate import Check

JOURNAL_VERSION = 1


CODE_PACKAGES = (
    "egovlp_deploy",
    "egovlp_deploy.model",
    "egovlp_deploy.kernels",
    "egovlp_deploy.export",
    "egovlp_deploy.data",
)


def code_files() -> list[tuple[str, Path]]:
    """(package, file) of the code that shapes an artifact or a verdict: the model, the kernels (their ONNX
    translation and custom ops), the exporters, the EgoMCQ readers of the task checks and the package's top-level
    modules (config, tokenizer, decoding, preprocessing, and its compiled extension). Wider than the minimum on
    purpose: an edit elsewhere costs a rerun its kept steps, a missed one would keep stale artifacts."""
    import importlib

    files = []
    for name in CODE_PACKAGES:
        seen = set()
        for folder in importlib.import_module(name).__path__:
            if name == "egovlp_deploy" and not (Path(folder) / "__init__.py").is_file():
                continue  # an editable install's extra path entry (the repository's root)
            found = sorted(Path(folder).glob("*.py")) + sorted(Path(folder).glob("_C*.so"))
            for path in found:
                if path.name not in seen:  # an editable install's generated file first, its source folder after
                    seen.add(path.name)
                    files.append((name, path))
    return files


def code_digest() -> str:
    h = hashlib.sha256()
    for package, path in code_files():
        h.update(f"{package}/{path.name}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def export_identity(source: dict, model_config_digest: str, settings: dict, tools: dict) -> dict:
    """What an unfinished export's finished steps depend on beyond the steps' own names (module docstring)."""
    checkpoint = {"kind": source.get("kind"), "sha256": source.get("sha256")}
    if source.get("kind") == "random":  # seeded weights: the preset and the config say which
        checkpoint["path"] = source.get("path")
    return {
        "version": JOURNAL_VERSION,
        "checkpoint": checkpoint,
        "model_config": model_config_digest,
        "settings": settings,
        "tools": tools,
        "cpu": cpu_capability(),
        "code": code_digest(),
    }


class Journal:
    """export-incomplete.json of a running export: `start` it before the first artifact is written, then
    `finished(key, ...)` after each step; `kept_artifact` / `kept_check` give a step an earlier run finished."""

    def __init__(self, out: Path, identity: dict, tokenizer_files: set[str], earlier: dict | None):
        self.out, self.identity, self.tokenizer_files = out, identity, sorted(tokenizer_files)
        self.done: dict[str, dict] = {}
        self.note = ""
        if earlier is not None:
            done = earlier.get("done")
            if earlier.get("identity") != identity:
                self.note = "an unfinished export with other settings, checkpoint, tools or code: starting over"
            elif isinstance(done, dict):
                self.done = {k: v for k, v in done.items() if isinstance(k, str) and isinstance(v, dict)}
                self.note = f"continuing an unfinished export ({len(self.done)} finished steps recorded)"

    @classmethod
    def start(cls, out: Path, identity: dict, tokenizer_files: set[str]) -> Journal:
        """Read the earlier run's journal (if any), record this run's, then retire the earlier manifest.json before
        any artifact of it is replaced: an interrupted run leaves a folder the runtime refuses as unfinished."""
        journal = cls(out, identity, tokenizer_files, read_journal(out))
        journal.save()
        (out / MANIFEST).unlink(missing_ok=True)
        return journal

    def save(self) -> None:
        from egovlp_deploy.checkpoint import atomic_write_bytes

        record = {
            "about": "an export into this folder has not finished: run `egovlp-deploy export ... --out` into it "
            "again; it keeps the finished steps listed here when its checkpoint, settings, tools and code are the same",
            "tokenizer_files": self.tokenizer_files,
            "identity": self.identity,
            "done": self.done,
        }
        atomic_write_bytes(self.out / INCOMPLETE, json.dumps(record, indent=2).encode())

    def finished(self, key: str, entry: ArtifactEntry | None = None, check: Check | None = None, **extra) -> None:
        """Record step `key` as finished: its artifact's manifest entry with the inode and change time of each of
        its files (as written here), its check and any `extra` JSON values."""
        record = dict(extra)
        if entry is not None:
            record["entry"] = asdict(entry)
            record["files"] = {
                name: _file_identity(self.out / name)
                for name in [entry.file] + [rec["file"] for rec in entry.external_data or []]
            }
        if check is not None:
            record["check"] = check.to_dict()
        self.done[key] = record
        self.save()

    def step_record(self, key: str) -> dict:
        """What step `key` recorded beside its entry and check ({} when it has not finished)."""
        return self.done.get(key, {})

    def kept_artifact(
        self, key: str, expected_file: Path, artifact_check: bool = True, **expected
    ) -> tuple[ArtifactEntry, Check | None] | None:
        """The entry and check of artifact step `key` when an earlier run of this identity finished it, its entry
        names `expected_file` and carries the `expected` field values (those this run would write: role, format,
        precision, io, derived_from, ...), and each of its files (external data included) is the one that run
        wrote there, with the recorded size and sha256. `artifact_check`: the step recorded a check against torch.
        None otherwise: the step is done again."""
        record = self.done.get(key)
        if record is None:
            return None
        try:
            entry = ArtifactEntry(**record["entry"])
            check = _check_from(record["check"], artifact_check) if artifact_check else None
            if entry.file != str(expected_file.relative_to(self.out)) or not _entry_types_hold(entry):
                return None
            if any(getattr(entry, name) != value for name, value in expected.items()):
                return None
            if check is not None and entry.validation.get("passed") is not check.passed:
                return None
            written = record["files"]
            names = [entry.file] + [rec["file"] for rec in entry.external_data or []]
            if not isinstance(written, dict) or sorted(written) != sorted(names):
                return None
            for rec in [{"file": entry.file, "bytes": entry.bytes, "sha256": entry.sha256}] + list(
                entry.external_data or []
            ):
                path = inside(self.out, rec["file"], f"{INCOMPLETE}: {key} file", error=ArtifactError)
                if _file_identity(path) != written[rec["file"]]:
                    return None  # replaced, copied in, or a link: not the file the earlier run wrote
                check_file(path, rec["bytes"], rec["sha256"])
        except (KeyError, TypeError, ValueError, AttributeError, ArtifactError, ManifestError, OSError):
            return None  # a damaged record or a changed file: not trusted
        return entry, check

    def kept_check(self, key: str, **expected) -> Check | None:
        """The check of step `key` (a task check) when an earlier run of this identity finished it with the same
        `expected` record values (e.g. the digest of its questions and the artifacts it ran on)."""
        record = self.done.get(key)
        if record is None or any(record.get(name) != value for name, value in expected.items()):
            return None
        try:
            return _check_from(record["check"], artifact_check=False)
        except (KeyError, TypeError, ValueError):
            return None


def _file_identity(path: Path) -> list[int]:
    """[inode, change time in ns] of a regular file (not a link): a copy, a replacement or a rename from elsewhere
    changes them, reading does not. ValueError for anything but a regular file."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: not a regular file")
    return [st.st_ino, st.st_ctime_ns]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _entry_types_hold(entry: ArtifactEntry) -> bool:
    """The types of the recorded entry's fields that this run does not compare with its own (the rest must equal)."""
    return (
        all(isinstance(getattr(entry, f.name), str) for f in fields(entry) if f.name in ("file", "sha256"))
        and type(entry.bytes) is int
        and entry.bytes >= 0
        and (entry.opset is None or (type(entry.opset) is int and entry.opset > 0))
        and (entry.export_seconds is None or _is_number(entry.export_seconds))
        and isinstance(entry.validation, dict)
        and isinstance(entry.external_data, (list, type(None)))
        and all(
            isinstance(rec, dict) and isinstance(rec.get("file"), str) and type(rec.get("bytes")) is int
            for rec in entry.external_data or []
        )
    )


def _check_from(data, artifact_check: bool) -> Check:
    """A recorded Check, its types verified (ValueError otherwise); an artifact's check holds its worst metrics."""
    check = Check(**data)
    ok = (
        isinstance(check.name, str)
        and type(check.passed) is bool
        and isinstance(check.metrics, dict)
        and isinstance(check.failures, list)
        and all(isinstance(f, str) for f in check.failures)
    )
    if ok and artifact_check:
        worst = check.metrics.get("worst")
        ok = isinstance(worst, dict) and all(_is_number(worst.get(k)) for k in ("min_cosine", "max_rel", "max_abs"))
    if not ok:
        raise ValueError("a recorded check of the wrong types")
    return check


def read_journal(out: Path) -> dict | None:
    """The earlier run's record in `out` (None when there is none); ValueError for one that is not a JSON object."""
    path = out / INCOMPLETE
    if not path.is_file():
        return None
    from egovlp_deploy.jsonfile import read_json

    return read_json(path, ValueError, expect=dict)


def task_inputs_digest(egomcq, video_root, tokenizer, max_questions: int) -> str:
    """The digest of what a task check ran on: the --egomcq questions file and the --tokenizer files (hashed), the
    --video-root folder (by path: its videos are not hashed) and --max-questions; random questions come from the
    model, which the identity covers."""
    from egovlp_deploy.hashing import sha256_tree
    from egovlp_deploy.tokenizer import TOKENIZER_SUFFIXES

    value = {
        "egomcq": sha256_tree(egomcq) if egomcq else None,
        "tokenizer": sha256_tree(tokenizer, suffixes=TOKENIZER_SUFFIXES) if tokenizer else None,
        "video_root": str(Path(video_root).resolve()) if video_root else None,
        "max_questions": max_questions,
    }
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
