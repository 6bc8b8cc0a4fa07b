"""Reading the project's JSON files (configs, export manifests, checkpoint manifests, indexes, question files) with
one named error for every way a file can be bad: missing, unreadable, not UTF-8, not JSON, not the expected kind
of value. Each caller passes its own exception class, so a bad file surfaces as that module's error (ConfigError,
ManifestError, CheckpointError, ...) and never as a bare UnicodeDecodeError or JSONDecodeError.

Torch-free on purpose: the light CLI paths (configs, indexes) import it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

_KINDS = {dict: "a JSON object", list: "a JSON array"}
# Far above any JSON file the project writes or reads (an index of a million videos is a few hundred MB); a larger
# file is refused before it is read, instead of exhausting the memory of the process that reads it.
MAX_JSON_BYTES = 1 << 30


def json_text(value: Any, **dumps_options) -> str:
    """`value` as standard JSON: a NaN or infinite float (an accuracy over no questions, a skipped step's loss)
    becomes null, where json.dumps would write the bare NaN / Infinity that jq, JavaScript and other strict
    readers refuse."""

    def finite(v):
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), allow_nan=False, **dumps_options)


class _Refused(Exception):
    """A file refused before it is read (not a regular file, or too large): read_json raises the caller's error."""


def _read_text(path: Path) -> str:
    """The file's text, read only when it is a regular file of at most MAX_JSON_BYTES: opened non-blocking, so a
    FIFO (or a device such as /dev/zero) in a JSON file's place is refused at once instead of blocking the reader
    forever or filling its memory. A regular file is then read blocking: a file under a lease (a Samba oplock, an
    NFS delegation) makes a non-blocking open fail at once where a blocking one waits for the lease, and some
    network filesystems return short reads on a non-blocking descriptor."""
    nonblocking = getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, os.O_RDONLY | nonblocking)
    except BlockingIOError:  # a leased regular file (a FIFO opens at once): wait for it as any reader does
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise
        fd = os.open(path, os.O_RDONLY)
    with open(fd, "rb") as f:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
        if not stat.S_ISREG(info.st_mode):
            raise _Refused(f"{path}: not a regular file (a FIFO, socket or device); cannot be read as JSON")
        if info.st_size > MAX_JSON_BYTES:
            raise _Refused(
                f"{path}: {info.st_size / 1e9:.1f} GB, too large to be one of our JSON files "
                f"(at most {MAX_JSON_BYTES >> 20} MiB)"
            )
        if nonblocking:
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~nonblocking)
        return f.read().decode("utf-8")


def read_json(
    path: str | os.PathLike,
    error: type[Exception] = ValueError,
    *,
    expect: type | None = None,
    missing: str | None = None,
) -> Any:
    """The parsed content of `path`; raises `error` naming the file and the problem.

    expect: dict or list, to require that top-level kind. missing: the message when the file does not exist
    (default "<path>: no such file").
    """
    path = Path(path)
    try:
        text = _read_text(path)
    except _Refused as exc:
        raise error(str(exc)) from None
    except FileNotFoundError as exc:
        raise error(missing or f"{path}: no such file") from exc
    except UnicodeDecodeError as exc:  # a binary or truncated-mid-character file
        raise error(f"{path}: not valid JSON ({exc})") from exc
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc})") from exc
    except MemoryError:
        raise error(f"{path}: too large to read into memory") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:  # names the line and column
        raise error(f"{path}: not valid JSON ({exc})") from exc
    except RecursionError as exc:  # thousands of nested brackets: no file of ours nests deeper than a few levels
        raise error(f"{path}: nested too deeply to be read as JSON") from exc
    except MemoryError:
        raise error(f"{path}: too large to read into memory") from None
    if expect is not None and not isinstance(data, expect):
        raise error(f"{path}: expected {_KINDS.get(expect, expect.__name__)}, got {type(data).__name__}")
    return data
