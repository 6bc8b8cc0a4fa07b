"""Training checkpoints that never lose work and never unpickle.

A checkpoint is a directory `step_00000100/` holding
- `model.safetensors` + `config.json`  (an `EgoVLPv2.from_pretrained` directory, usable for export as is)
- `state.safetensors` + `state.json`   (optimizer, scheduler, scaler, RNG states, step, epoch, data position, the
                                        training data's fingerprint, load-failure counts: tensors in safetensors,
                                        everything else JSON)
- `run.json`                            (the training config of the run)
- `MANIFEST.json`                       (sha256 + size of every file, written last)
It is built in a temp directory `.step_00000100.<random>` and renamed into place, so a crash leaves either the
whole checkpoint or none; a killed save's temp directory is removed at the next start (`remove_stale_temp_dirs`).
On resume the newest directory whose manifest verifies is taken; a truncated or corrupt one is reported and skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from egovlp_deploy.checkpoint import (
    MANIFEST,
    CheckpointError,
    atomic_write_bytes,
    list_checkpoints,
    load_safetensors,
    make_temp_dir,
    save_safetensors,
    verify_checkpoint,
)
from egovlp_deploy.hashing import sha256_file

# The temp directory a save builds in: tempfile.mkdtemp(prefix=".step_<8 digits>.") adds 8 letters, digits or "_".
TEMP_DIR = re.compile(r"^\.step_\d{8}\.[a-z0-9_]{8}$")


# -- nested state <-> (JSON skeleton, tensors) ------------------------------------------------------------------
def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "s") -> Any:
    """Replace every tensor in a nested dict/list structure by {"__tensor__": key}; collect them in `tensors`."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"cannot store dict keys of types {sorted({type(k).__name__ for k in obj})}")
        # JSON keys are strings: remember which were ints (optimizer states are keyed by parameter index)
        return {"__dict__": [[k, flatten_state(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {
            "__list__": [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)],
            "tuple": isinstance(obj, tuple),
        }
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The nested structure `flatten_state` stored; CheckpointError if it names a tensor `tensors` lacks."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            key = obj["__tensor__"]
            if not isinstance(key, str) or key not in tensors:
                raise CheckpointError(f"state.safetensors lacks the tensor {key!r} that state.json names")
            return tensors[key]
        if "__dict__" in obj:
            return {k: unflatten_state(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [unflatten_state(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


# -- the training data a data position indexes -----------------------------------------------------------------
def data_fingerprint(annotations: list[str], video_root: str, videos: list[str]) -> dict[str, Any]:
    """What identifies a run's training data, cheaply: the sha256 of each annotation file the dataset reads (the rows;
    by file name, so a moved data root still matches) and one sha256 over the names and sizes of the video files its
    rows read (`videos`, names relative to `video_root`). Sizes, not modification times: a copy of the data to
    another machine keeps the sizes and changes the times; a re-encoded or replaced video almost never keeps its
    size. The videos themselves are too large to hash."""
    out: dict[str, Any] = {"annotations": [[Path(p).name, sha256_file(p)] for p in annotations]}
    listing = hashlib.sha256()
    for name in videos:
        try:
            size = (Path(video_root) / name).stat().st_size
        except (OSError, ValueError):  # missing (lax mode trains it as a black clip): recorded as such
            size = -1
        listing.update(f"{name}\t{size}\n".encode("utf-8", "surrogateescape"))
    out["videos"] = [len(videos), listing.hexdigest()]
    return out


def fingerprint_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two `data_fingerprint`s, as short phrases ([] when nothing that both record does)."""
    changes = []
    old, new = saved.get("annotations") or [], current.get("annotations") or []
    if [name for name, _ in old] != [name for name, _ in new]:
        changes.append(f"annotation files {[n for n, _ in old]} -> {[n for n, _ in new]}")
    else:
        changes += [f"{name} was edited (sha256 {a[:12]} -> {b[:12]})" for (name, a), (_, b) in zip(old, new) if a != b]
    if saved.get("videos") is not None and current.get("videos") is not None:
        (old_count, old_digest), (new_count, new_digest) = saved["videos"], current["videos"]
        if old_count != new_count:
            changes.append(f"the rows read {new_count} video files, not {old_count}")
        elif old_digest != new_digest:
            changes.append(f"a video file of the {new_count} the rows read was replaced (the file sizes differ)")
    return changes


# -- files -----------------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    directory: str | os.PathLike, step: int, model, state: dict, run_config: dict, keep_last: int = 3
) -> Path:
    """Write checkpoint `step` atomically under `directory` and prune all but the newest `keep_last`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:08d}"
    tmp = make_temp_dir(directory, f".step_{step:08d}.")
    try:
        model.save_pretrained(tmp)
        tensors: dict[str, torch.Tensor] = {}
        skeleton = flatten_state(state, tensors)
        save_safetensors(tensors, tmp / "state.safetensors")
        atomic_write_bytes(tmp / "state.json", json.dumps(skeleton).encode())
        atomic_write_bytes(tmp / "run.json", json.dumps(run_config, indent=2, sort_keys=True).encode())
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        atomic_write_bytes(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=2).encode())
        _fsync_dir(tmp)
        # A second save of the same step (the step's own save, then the epoch end's, or the final one) replaces the
        # first. The two directories are swapped in one step where the system can: deleting the old one first
        # would leave no checkpoint of this step while it is deleted, and with keep_last 1 no checkpoint at all
        # for a kill in that moment to resume from. The old one, now under the temp name, is removed below (or, if
        # the process dies first, as a stale temp directory at the next start).
        replaced = final.exists() and _exchange(tmp, final)
        if not replaced:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replaced:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(directory)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where the system or the file
    system cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):  # no such call, or no C library to look in
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def remove_stale_temp_dirs(directory: str | os.PathLike) -> list[Path]:
    """Remove the temp directories of saves that were killed before their rename (only names save_checkpoint
    creates); returns them. Call it before any save starts: a running save's temp directory has the same form."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if TEMP_DIR.match(p.name) and p.is_dir() and not p.is_symlink()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def load_checkpoint(path: Path, map_location="cpu") -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(model state dict, training state, run config) of a verified checkpoint directory."""
    verify_checkpoint(path)
    weights = load_safetensors(path / "model.safetensors", map_location)
    tensors = load_safetensors(path / "state.safetensors", map_location)
    try:
        state = unflatten_state(json.loads((path / "state.json").read_text()), tensors)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    run_config = json.loads((path / "run.json").read_text())
    return weights, state, run_config
