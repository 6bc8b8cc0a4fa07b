"""Checkpoint I/O: our safetensors format, and the official `.pth` files read without executing pickled code.

Official files are `torch.save({'state_dict': {'module.' + k: v}, 'config': <pickled ConfigParser>, ...})` zip
archives (torch.save's zip format). We read the archive ourselves: `data.pkl` goes through a restricted unpickler that
resolves only the handful of globals that rebuild tensors and containers, and turns every other global (the
pickled config object, or `os.system` in a malicious file) into an inert placeholder that is never called.

Sizes are checked before anything is allocated or decompressed: each storage's declared size against its zip entry,
all storages together against the archive's size on disk (torch writes storages uncompressed, so a zip bomb cannot
hide behind a small file) and a ceiling, and each tensor view against the bytes of its storage. Archive members are
decompressed as a stream that stops at the declared size.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import pickle
import re
import stat
import struct
import tempfile
import warnings
import zipfile
import zlib
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .config import EgoVLPv2Config, TextConfig, VideoConfig, check_num_frames
from .hashing import CHECKPOINT_SUFFIXES, sha256_file
from .jsonfile import read_json


class CheckpointError(ValueError):
    """A checkpoint is unreadable, truncated, foreign, or does not fit the model."""


# What a torch zip checkpoint may unpack to: its storages and data.pkl together hold at most EXPANSION times the
# archive's bytes on disk plus SLACK (torch stores members uncompressed: a genuine file unpacks to less than its
# size), and never more than MAX_STORAGE_BYTES (EGOVLP_MAX_CHECKPOINT_BYTES raises it).
EXPANSION = 8
SLACK = 64 << 20
MAX_STORAGE_BYTES = int(os.environ.get("EGOVLP_MAX_CHECKPOINT_BYTES", 64 << 30))


# -- training checkpoint directories ------------------------------------------------------------------------------
# A trainer checkpoint is a folder `step_00000100/` whose MANIFEST.json, written last, lists the sha256 and size of
# every file in it (trainer/training_state.py writes them); reading one verifies it first.
MANIFEST = "MANIFEST.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoint directories by step, oldest first (temp directories of interrupted saves are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# A manifest must list every file of the folder that identifies the checkpoint (hashing.CHECKPOINT_SUFFIXES): its
# loaders read them trusting the manifest (no digest of their own is checked).


def _manifest_files(path: Path) -> dict:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (the save did not finish)")
    files = read_json(manifest_path, CheckpointError, expect=dict).get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{manifest_path}: no 'files' table of name -> size and checksum")
    for name, meta in files.items():
        if name in ("", ".", "..", MANIFEST) or "/" in name:
            raise CheckpointError(f"{manifest_path}: {name!r:.80} is not the name of a file in the checkpoint")
        if not (
            isinstance(meta, dict)
            and _is_count(meta.get("bytes"))
            and isinstance(meta.get("sha256"), str)
            and _SHA256.match(meta["sha256"])
        ):
            raise CheckpointError(f"{manifest_path}: the entry of {name} is not {{'bytes': size, 'sha256': hex}}")
    uncovered = sorted(
        p.name
        for p in path.iterdir()
        if p.suffix in CHECKPOINT_SUFFIXES and p.name != MANIFEST and p.name not in files and p.is_file()
    )
    if uncovered:
        raise CheckpointError(f"{manifest_path} does not list {', '.join(uncovered)}: they cannot be verified")
    return files


def checkpoint_hashes(path: Path) -> dict[str, str]:
    """{file name: sha256} as the checkpoint's MANIFEST.json lists them, read, not recomputed: for a checkpoint that
    was just verified, so its files need not be read again to name them."""
    return {name: meta["sha256"] for name, meta in _manifest_files(path).items()}


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless every file of the manifest is present with its size and checksum."""
    for name, meta in _manifest_files(path).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if file.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{path}: {name} is truncated ({file.stat().st_size} of {meta['bytes']} bytes)")
        if sha256_file(file) != meta["sha256"]:
            raise CheckpointError(f"{path}: {name} fails its checksum (corrupt)")


def latest_valid_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint that verifies; broken newer ones are reported with a warning and skipped."""
    for path in reversed(list_checkpoints(directory)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as exc:
            warnings.warn(f"skipping checkpoint {exc}; falling back to the previous one", stacklevel=2)
    return None


# -- atomic writes ----------------------------------------------------------------------------------------------
def creation_mode(base: int) -> int:
    """The permission bits open() (base 0o666) or mkdir() (base 0o777) give a new file under the process umask:
    tempfile creates its files 0o600 and folders 0o700, which would make every artifact private to its writer."""
    mask = None
    try:  # Linux: read the umask without changing it (os.umask's set-and-restore races with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                mask = int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return base & ~mask


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new temp folder in `parent` (built there, then renamed into place) with the permissions mkdir() gives."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(tmp, creation_mode(0o777))
    return tmp


def atomic_temp_names(name_pattern: str) -> re.Pattern:
    """The names of the temp files `atomic_write_bytes` leaves where a kill stops it while it writes a file whose
    name matches the regex `name_pattern`: `.<name>.<mkstemp's 8 characters>.tmp` (use with fullmatch)."""
    return re.compile(rf"\.(?:{name_pattern})\.[a-z0-9_]{{8}}\.tmp")


def atomic_write_bytes(path: str | os.PathLike, data: bytes | list) -> None:
    """Write to a temp file in the same directory, fsync, then rename: readers never see a partial file.
    `data` is one bytes-like object or a list of them, written in order. The file gets the permissions of the
    file it replaces, or those open() gives a new file."""
    path = Path(path)
    if not path.parent.is_dir():  # else the error would name the temp file
        raise FileNotFoundError(f"{path}: its folder {path.parent} does not exist")
    try:
        mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else creation_mode(0o666)
    except OSError:
        mode = creation_mode(0o666)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            for part in data if isinstance(data, list) else [data]:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_output_file(path: str | os.PathLike, option: str, inputs=()) -> None:
    """Refuse (ValueError), before a long run, an output file that `atomic_write_bytes` cannot write at the run's
    end or that would overwrite an input. `inputs` holds (label, path) pairs: an input file is refused as the output
    (through symlinks too), and an input folder (a model checkpoint or run folder) refuses every path inside it."""
    path = Path(path)
    # atomic_write_bytes makes its temp file in the unresolved parent and renames it over `path`: a symlink at
    # `path` is replaced by the file, not written through, so the link's own folder is the one that must take it
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: its folder does not exist")
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a folder, not a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: its folder is not writable")
    places = {folder.resolve() / path.name, path.resolve()}  # the entry the rename replaces, and a link's target
    for label, given in inputs:
        given = Path(given)
        if given.is_dir():
            inside = given.resolve()
            if any(place.is_relative_to(inside) for place in places):
                raise ValueError(f"{option} {path}: is inside the {label} folder {given}; name a file outside it")
        elif given.is_file() and path.is_file() and path.samefile(given):
            raise ValueError(f"{option} {path}: is the {label} file; name another file")


# -- safetensors with a checksum ----------------------------------------------------------------------------------
# Our safetensors files carry the sha256 of their data section (every tensor's bytes) in the header's metadata, so a
# file is checked on load even where no manifest covers it. Files written by other tools have no digest and load
# unchecked (`safetensors_digest` says which).
DIGEST_KEY = "egovlp.data_sha256"
_MAX_HEADER = 100 << 20  # the safetensors library's own limit on the header


def _split(blob) -> tuple[dict, memoryview]:
    view = memoryview(blob)
    (n,) = struct.unpack("<Q", view[:8])
    return json.loads(bytes(view[8 : 8 + n])), view[8 + n :]


def _join(header: dict, data) -> list:
    """A safetensors file's parts from its header and data section, the metadata keys sorted: the library keeps
    metadata in a hash map, so two keys come out in either order from one process to the next, and the same
    tensors would not give the same bytes."""
    if header.get("__metadata__"):
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section stays 8-byte aligned, as the library writes it
    return [struct.pack("<Q", len(raw)), raw, data]


def stable_safetensors(blob: bytes) -> list:
    """`safetensors.*.save(...)` output with its metadata keys in a fixed order (for atomic_write_bytes)."""
    return _join(*_split(blob))


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    header, data = _split(save(tensors, metadata=metadata))
    header["__metadata__"] = {**(header.get("__metadata__") or {}), DIGEST_KEY: hashlib.sha256(data).hexdigest()}
    atomic_write_bytes(path, _join(header, data))


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file's header (nothing hashed); {} where there is none or the file is
    unreadable (the library's load names the problem)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            header = json.loads(f.read(n)) if 0 < n <= _MAX_HEADER else None
    except (OSError, ValueError, RecursionError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {k: v for k, v in meta.items() if isinstance(v, str)} if isinstance(meta, dict) else {}


def safetensors_digest(path: str | os.PathLike) -> str | None:
    """The data digest a safetensors file declares (header only, nothing hashed), or None."""
    return safetensors_metadata(path).get(DIGEST_KEY)


def _check_digest(path: Path) -> None:
    digest = safetensors_digest(path)
    if digest is None:
        return
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    if sha256_file(path, offset=8 + n) != digest:
        raise CheckpointError(f"{path}: the tensor data fails its sha256 (the file is corrupt)")


def load_safetensors(path: str | os.PathLike, map_location="cpu", check_digest: bool = True) -> dict[str, torch.Tensor]:
    """The file's tensors. With `check_digest`, a file that declares a data digest is hashed and a mismatch raises
    CheckpointError (pass False only where a verified manifest already covers the file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device=str(map_location))  # the structure first: truncation is named so
        if check_digest:
            _check_digest(Path(path))
        return tensors
    except (SafetensorError, OSError, ValueError, struct.error) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc


# The floating-point dtypes a weight may be stored in. Others a file can declare (float8, float4 and friends) have no
# isfinite and no cast to every parameter dtype in torch: they are wrong dtypes, not crashes deep in a check.
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def weight_dtype_problem(value: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether `value` cannot fill `target` by a cast: integer or complex data for a floating-point parameter (or
    the reverse), or a floating-point dtype outside WEIGHT_DTYPES."""
    if value.is_floating_point() != target.is_floating_point():
        return True
    return value.is_floating_point() and value.dtype not in WEIGHT_DTYPES


def load_state_dict_strict(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str, assign: bool = False
) -> None:
    """Load every key exactly; on any mismatch raise one error that lists missing, unexpected and misshapen keys,
    integer or complex tensors for floating-point parameters, and tensors holding NaN or infinity.

    Tensors are cast to the model's dtypes (a half-precision file loads into an fp32 model). `assign=True` adopts
    the tensors instead of copying them (for a model built on the meta device)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    common = sorted(set(expected) & set(state_dict))
    misshapen = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in common
        if state_dict[k].shape != expected[k].shape
    ]
    # a cast makes integer data (quantised or foreign) look like weights, and a NaN or inf weight gives NaN
    # scores that rank like numbers: both are refused, not loaded
    mistyped = [
        f"{k}: checkpoint {state_dict[k].dtype} vs model {expected[k].dtype}"
        for k in common
        if weight_dtype_problem(state_dict[k], expected[k])
    ]
    non_finite = [
        k for k in common if state_dict[k].dtype in WEIGHT_DTYPES and not bool(torch.isfinite(state_dict[k]).all())
    ]
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("wrong shapes", misshapen),
        ("wrong dtypes", mistyped),
        ("NaN or infinite values", non_finite),
    ):
        if items:
            shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model or is unusable; " + "; ".join(problems))
    state_dict = {k: v.to(expected[k].dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=assign)


# -- safe reading of torch zip checkpoints ---------------------------------------------------------------------
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class Inert:
    """Stands in for any global a checkpoint names that we do not allow. It records its arguments, runs nothing."""

    qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("list", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("list", []).extend(values)

    def __repr__(self):
        return f"<inert {self.qualname}>"


def _inert_class(module: str, name: str) -> type:
    return type(f"Inert_{name}", (Inert,), {"qualname": f"{module}.{name}"})


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *rest):
    if not isinstance(storage, torch.Tensor):
        raise CheckpointError("malformed checkpoint: a tensor refers to something that is not a storage")
    _check_view(storage.numel(), storage_offset, size, stride)
    return storage.as_strided(tuple(size), tuple(stride), storage_offset)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_view(available: int, offset, size, stride) -> None:
    """A tensor view may address only its storage's elements and may not declare more elements than the storage
    holds: a stride-0 view of 8 bytes declaring 4e9 elements would cost 32 GB in the first op that copies it."""
    if not (
        isinstance(size, (tuple, list))
        and isinstance(stride, (tuple, list))
        and len(size) == len(stride)
        and all(map(_is_count, size))
        and all(map(_is_count, stride))
        and _is_count(offset)
    ):
        raise CheckpointError(
            f"malformed checkpoint: a tensor has size {size!r:.80}, stride {stride!r:.80}, offset {offset!r:.40}"
        )
    numel = math.prod(size)
    if numel == 0:
        return
    last = offset + sum((n - 1) * st for n, st in zip(size, stride))
    if numel > available - offset or last >= available:
        raise CheckpointError(
            f"malformed checkpoint: a tensor of shape {tuple(size)} (stride {tuple(stride)}, "
            f"offset {offset}) does not fit its storage of {available} elements"
        )


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, *rest):
    return _rebuild_tensor(storage.view(dtype) if storage.dtype != dtype else storage, storage_offset, size, stride)


def _view_of(tensor: torch.Tensor) -> tuple:
    return tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.storage_offset(), tensor.data_ptr()


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch", "Size"): tuple,
}


class _Budget:
    """The bytes an archive may still unpack to; `take` checks a member before it is read."""

    def __init__(self, path: Path, archive_bytes: int):
        self.path = path
        self.left = min(EXPANSION * archive_bytes + SLACK, MAX_STORAGE_BYTES)
        self.limit = self.left

    def take(self, name: str, nbytes: int) -> None:
        if nbytes > self.left:
            raise CheckpointError(
                f"{self.path}: {name} would unpack past {self.limit} bytes in all (at most "
                f"{EXPANSION}x the file's {self.path.stat().st_size} bytes + {SLACK >> 20} MiB, "
                f"ceiling {MAX_STORAGE_BYTES}); refusing a corrupt or hostile checkpoint"
            )
        self.left -= nbytes


def _read_member(archive: zipfile.ZipFile, name: str, expected: int | None, budget: _Budget) -> bytearray:
    """The member's bytes, decompressed as a stream into one buffer of the size its entry declares (checked against
    `expected` and the budget first); a stream that runs past that size is an error, never a bigger buffer."""
    info = archive.getinfo(name)
    if expected is not None and info.file_size != expected:
        raise CheckpointError(
            f"{budget.path}: truncated or corrupt checkpoint: {name} holds {info.file_size} bytes, "
            f"its tensor needs {expected}"
        )
    budget.take(name, info.file_size)
    out = bytearray(info.file_size)
    view, filled = memoryview(out), 0
    with archive.open(info) as member:
        while filled < len(out):
            chunk = member.read(min(1 << 20, len(out) - filled))
            if not chunk:
                raise CheckpointError(
                    f"{budget.path}: truncated checkpoint: {name} ends after {filled} of {len(out)} bytes"
                )
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        if member.read(1):
            raise CheckpointError(f"{budget.path}: corrupt checkpoint: {name} is longer than its entry declares")
    return out


# A pickle's memo lets a few hundred bytes build a tuple that holds the same tuple twice, forty levels deep: hashing
# it (a dict key), comparing it or writing its repr (an error message) then takes 2^40 steps in C code that no signal
# interrupts. `check_pickle_expansion` simulates the pickle's stack on its opcodes (nothing is built or called) and
# refuses one whose objects, expanded into trees, hold more than this many parts per opcode (with a floor): a
# torch pickle expands to a few parts per opcode.
EXPANSION_PER_OPCODE = 64
MIN_EXPANSION = 1 << 20
_MUTATORS = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}  # change the object below them


class _Unsimulated(Exception):
    """The opcodes are not a well-formed pickle: the unpickler itself reports that."""


def _pickle_expansion(file) -> tuple[int, int]:
    """(opcodes read, the largest number of parts one object of the pickle expands to as a tree)."""
    import pickletools

    mark = object()
    children: list[list[int]] = []
    stack: list = []
    memo: dict = {}

    def new(kids) -> int:
        children.append([k for k in kids if k is not mark])
        return len(children) - 1

    count = 0
    for count, (op, arg, _pos) in enumerate(pickletools.genops(file), 1):  # noqa: B007
        name = op.name
        if name in ("PROTO", "FRAME", "STOP"):
            continue
        if name == "MARK":
            stack.append(mark)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            if not stack:
                raise _Unsimulated
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise _Unsimulated
            stack.append(memo[arg])
        elif name == "DUP":
            stack.append(stack[-1] if stack else new([]))
        else:
            before = op.stack_before
            popped: list = []
            if pickletools.markobject in before:
                while stack and stack[-1] is not mark:
                    popped.append(stack.pop())
                if not stack:
                    raise _Unsimulated
                stack.pop()
                fixed = before.index(pickletools.markobject)
            else:
                fixed = len(before)
            if len(stack) < fixed:
                raise _Unsimulated
            below = [stack.pop() for _ in range(fixed)][::-1]
            if name in _MUTATORS and below and below[0] is not mark:
                children[below[0]].extend(k for k in below[1:] + popped if k is not mark)
                stack.append(below[0])
            elif op.stack_after:
                stack.append(new(below + popped))
    cap = max(MIN_EXPANSION, EXPANSION_PER_OPCODE * count) + 1  # sizes stop growing there: small integers
    sizes: dict[int, int] = {}
    visiting: set[int] = set()
    largest = 0
    for root in range(len(children)):  # each node's size after its children's (iterative: no recursion limit)
        todo = [(root, False)]
        while todo:
            node, expanded = todo.pop()
            if node in sizes:
                continue
            if expanded:
                visiting.discard(node)
                sizes[node] = min(cap, 1 + sum(sizes.get(k, 1) for k in children[node]))  # a cycle counts once
                largest = max(largest, sizes[node])
            elif node not in visiting:
                visiting.add(node)
                todo.append((node, True))
                todo.extend((k, False) for k in children[node] if k not in sizes and k not in visiting)
    return count, largest


def check_pickle_expansion(file, where: str, error: type[Exception] = None) -> None:
    """Raise `error` (CheckpointError) when the pickle read from `file` (bytes or a binary file positioned at it;
    a file is left where it was) builds an object that expands past the limit above."""
    error = error or CheckpointError
    stream = io.BytesIO(file) if isinstance(file, (bytes, bytearray, memoryview)) else file
    start = stream.tell()
    try:
        count, largest = _pickle_expansion(stream)
    except (_Unsimulated, ValueError, IndexError, EOFError, struct.error) as exc:
        # refused, not left to the unpickler: it runs the opcodes one by one, so it would build (and hash) a bomb
        # that comes before the malformed part (a cut-off STOP, a trailing byte, an argument it reads otherwise)
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise error(f"{where}: corrupt checkpoint: its pickle cannot be read ({detail})") from None
    finally:
        stream.seek(start)
    if largest > max(MIN_EXPANSION, EXPANSION_PER_OPCODE * count):
        raise error(
            f"{where}: the pickle builds an object of {largest} parts from {count} opcodes (shared parts "
            f"nested in each other); refusing a corrupt or hostile checkpoint"
        )


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, budget: _Budget):
        super().__init__(file)
        self.archive, self.prefix, self.storages, self.budget = archive, prefix, {}, budget
        self.foreign: list[str] = []
        self.built: list[tuple] = []

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            found = _ALLOWED_GLOBALS[(module, name)]
            return functools.partial(self._record, found) if found in (_rebuild_tensor, _rebuild_tensor_v3) else found
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)  # a dtype object, inert data
        self.foreign.append(f"{module}.{name}")
        return _inert_class(module, name)

    def _record(self, rebuild, *args):
        tensor = rebuild(*args)
        self.built.append((tensor, _view_of(tensor)))
        return tensor

    def check_built(self) -> None:
        """A pickle's BUILD on a tensor runs Tensor.__setstate__, which re-views it (`set_`) past the checks of
        `_check_view`, or sets requires_grad and backward hooks: every tensor must still be as it was built."""
        for tensor, view in self.built:
            if _view_of(tensor) != view or tensor.requires_grad or tensor._backward_hooks is not None:
                raise CheckpointError("malformed checkpoint: pickled state is applied to a tensor after it is built")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"malformed checkpoint: unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid[:5]
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else torch.uint8
        if not isinstance(key, str) or not _is_count(numel):
            raise CheckpointError(f"malformed checkpoint: storage key {key!r:.40} with {numel!r:.40} elements")
        if key not in self.storages:
            expected = numel * torch.empty((), dtype=dtype).element_size()
            try:
                raw = _read_member(self.archive, f"{self.prefix}/data/{key}", expected, self.budget)
            except KeyError as exc:
                raise CheckpointError(f"truncated checkpoint: storage {key} is missing") from exc
            self.storages[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return self.storages[key]


def is_safetensors_file(path: Path) -> bool:
    """Whether the file starts as safetensors does: an 8-byte little-endian header length within the file, then
    the JSON header's opening brace."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size


def _not_zip_reason(path: Path, exc: Exception) -> str:
    """What a file that is not a torch zip archive is, for the error that refuses it."""
    if is_safetensors_file(path):
        return "a safetensors file, not a torch checkpoint: give the folder that holds it with its config.json"
    with open(path, "rb") as f:
        first = f.read(1)
    if first == b"\x80":  # a pickle protocol opcode: torch's format before its zip archives (torch < 1.6)
        return (
            "a torch checkpoint in the legacy (pre-1.6, non-zip) format, which only unpickling reads, and a "
            "checkpoint is never unpickled here: re-save it with torch.save (torch >= 1.6) where you trust it"
        )
    return f"not a torch zip checkpoint, or truncated (zip directory unreadable: {exc})"


def read_torch_checkpoint(path: str | os.PathLike) -> Any:
    """Read a `torch.save` zip archive like `torch.load`, but without running any pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"{path}: {_not_zip_reason(path, exc)}") from exc
    with archive:
        names = archive.namelist()
        if len(set(names)) != len(names):  # readers differ on which copy they take: the tensors would be ambiguous
            twice = sorted(n for n, count in Counter(names).items() if count > 1)  # linear: archives list 1e5 names
            raise CheckpointError(f"{path}: corrupt checkpoint: the archive holds {twice[0]!r:.80} more than once")
        pickles = [n for n in names if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: not a torch checkpoint (expected one data.pkl, found {len(pickles)})")
        prefix = pickles[0][: -len("/data.pkl")]
        byteorder = f"{prefix}/byteorder"
        budget = _Budget(path, path.stat().st_size)
        try:
            if byteorder in archive.namelist() and _read_member(archive, byteorder, None, budget).strip() not in (
                b"little",
                b"",
            ):
                raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
            data = _read_member(archive, pickles[0], None, budget)
            check_pickle_expansion(data, f"{path}: {pickles[0]}")
            unpickler = _RestrictedUnpickler(io.BytesIO(data), archive, prefix, budget)
            obj = unpickler.load()
            unpickler.check_built()
            return obj
        except CheckpointError as exc:
            if str(path) in str(exc):
                raise
            raise CheckpointError(f"{path}: {exc}") from exc
        except (
            zipfile.BadZipFile,
            EOFError,
            pickle.UnpicklingError,
            ValueError,
            TypeError,
            KeyError,
            IndexError,
            AttributeError,
            RuntimeError,
            NotImplementedError,
            zlib.error,
        ) as exc:
            raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: {exc})") from exc


# -- official EgoVLPv2 checkpoints ----------------------------------------------------------------------------
_DERIVED_BUFFERS = ("text_model.embeddings.position_ids",)  # persistent in the official code, but just arange()
# The tensors whose shapes give the architecture (config_from_state_dict) and the frame count, by rank.
_RANKS = {
    "video_model.pos_embed": 3,
    "video_model.temporal_embed": 3,
    "video_model.patch_embed.proj.weight": 4,
    "video_model.blocks.0.mlp.fc1.weight": 2,
    "text_model.embeddings.word_embeddings.weight": 2,
    "text_model.embeddings.position_embeddings.weight": 2,
    "text_model.embeddings.token_type_embeddings.weight": 2,
    "text_model.encoder.layer.0.intermediate.dense.weight": 2,
    "txt_proj.0.weight": 2,
    "txt_proj.1.weight": 2,
}


def official_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The official file's state dict with DDP's `module.` prefix removed, checked to be EgoVLPv2."""
    obj = read_torch_checkpoint(path)
    # dict's own methods, not the object's: a pickle can set attributes on the OrderedDicts it builds, `items`
    # included, and those would shadow the methods
    state_dict = dict.get(obj, "state_dict") if isinstance(obj, dict) else None
    if (
        state_dict is None
        and isinstance(obj, dict)
        and obj
        and all(isinstance(v, torch.Tensor) for v in dict.values(obj))
    ):
        state_dict = obj  # a bare state dict
    if not isinstance(state_dict, dict):
        found = f"a dict of {sorted(map(str, dict.keys(obj)))[:8]}" if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: not an EgoVLPv2 checkpoint (no 'state_dict' entry; found {found})")
    out, original = {}, {}
    for key, value in dict.items(state_dict):
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: state_dict entry {key!r:.60} is not a named tensor")
        name = key[len("module.") :] if key.startswith("module.") else key
        if name in out:  # 'x' and 'module.x': which one the official code would load is unknowable
            raise CheckpointError(
                f"{path}: state_dict holds both {original[name]!r} and {key!r}, which name the same tensor"
            )
        out[name], original[name] = value, key
    for needed in (
        "video_model.pos_embed",
        "video_model.temporal_embed",
        "text_model.embeddings.word_embeddings.weight",
    ):
        if needed not in out:
            raise CheckpointError(f"{path}: not an EgoVLPv2 checkpoint (no {needed}; keys start {sorted(out)[:3]})")
    for key, rank in _RANKS.items():  # the shapes the architecture is read from, before any is indexed
        if key in out and (out[key].dim() != rank or 0 in out[key].shape):
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(out[key].shape)}, not a non-empty {rank}-D tensor; "
                f"this is not an EgoVLPv2 checkpoint"
            )
    return out


def _count(state_dict, prefix: str) -> int:
    indices = {k[len(prefix) :].split(".")[0] for k in state_dict if k.startswith(prefix)}
    return len([i for i in indices if i.isdigit()])


def config_from_state_dict(sd: dict[str, torch.Tensor], num_frames: int, head_dim: int = 64) -> EgoVLPv2Config:
    """Read the architecture off the weight shapes (head count is not stored: official models use 64-wide heads)."""
    try:
        width = sd["video_model.pos_embed"].shape[-1]
        patches = sd["video_model.pos_embed"].shape[1] - 1
        patch = sd["video_model.patch_embed.proj.weight"].shape[-1]
        side = int(round(patches**0.5))
        vocab, hidden = sd["text_model.embeddings.word_embeddings.weight"].shape
        if "txt_proj.0.weight" in sd:
            projection, proj_dim = "big", sd["txt_proj.0.weight"].shape[0]
        elif "txt_proj.1.weight" in sd:
            projection, proj_dim = "small", sd["txt_proj.1.weight"].shape[0]
        else:
            raise CheckpointError("no txt_proj weights (neither the big nor the small projection)")
        video = VideoConfig(
            img_size=side * patch,
            patch_size=patch,
            in_chans=sd["video_model.patch_embed.proj.weight"].shape[1],
            num_frames=num_frames,
            width=width,
            depth=_count(sd, "video_model.blocks."),
            heads=width // head_dim,
            mlp_ratio=sd["video_model.blocks.0.mlp.fc1.weight"].shape[0] / width,
        )
        text = TextConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=_count(sd, "text_model.encoder.layer."),
            num_attention_heads=hidden // head_dim,
            intermediate_size=sd["text_model.encoder.layer.0.intermediate.dense.weight"].shape[0],
            max_position_embeddings=sd["text_model.embeddings.position_embeddings.weight"].shape[0],
            type_vocab_size=sd["text_model.embeddings.token_type_embeddings.weight"].shape[0],
        )
        fused = {k.split(".")[3] for k in sd if k.startswith("text_model.encoder.layer.") and k.endswith(".alpha_t2i")}
        return EgoVLPv2Config(
            video=video, text=text, num_fuse_blocks=len(fused), projection=projection, projection_dim=proj_dim
        )
    except KeyError as exc:
        raise CheckpointError(f"not an EgoVLPv2 checkpoint: missing {exc.args[0]}") from exc
    except ValueError as exc:  # ConfigError from inconsistent shapes
        raise CheckpointError(f"inconsistent EgoVLPv2 checkpoint: {exc}") from exc


def resize_temporal_embed(temporal_embed: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The official `_inflate_positional_embeds`: truncate if the checkpoint has more frames, else bilinear
    interpolation with align_corners=True over (frames, dim), which is linear interpolation along time."""
    check_num_frames(num_frames)  # before a table of num_frames rows is allocated
    loaded = temporal_embed.shape[1]
    if loaded == num_frames:
        return temporal_embed
    if loaded > num_frames:
        return temporal_embed[:, :num_frames]
    dim = temporal_embed.shape[2]
    return (
        F.interpolate(temporal_embed.unsqueeze(0).float(), (num_frames, dim), mode="bilinear", align_corners=True)
        .squeeze(0)
        .to(temporal_embed.dtype)
    )


def load_official_state_dict(path, num_frames: int | None = None, config: EgoVLPv2Config | None = None):
    """(state dict ready for `EgoVLPv2(config)`, config) from an official checkpoint file."""
    sd = official_state_dict(path)
    ckpt_frames = sd["video_model.temporal_embed"].shape[1]
    if num_frames is not None:
        check_num_frames(num_frames)
    frames = num_frames or (config.video.num_frames if config is not None else ckpt_frames)
    if config is None:
        try:
            config = config_from_state_dict(sd, frames)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
    else:
        config = config.with_num_frames(frames)
    for key in _DERIVED_BUFFERS:
        buf = sd.pop(key, None)
        if buf is not None and not torch.equal(buf.reshape(-1), torch.arange(buf.numel(), dtype=buf.dtype)):
            raise CheckpointError(f"{path}: {key} is not 0..n-1; this is not an EgoVLPv2 text model")
    sd["video_model.temporal_embed"] = resize_temporal_embed(sd["video_model.temporal_embed"], frames)
    return sd, config
