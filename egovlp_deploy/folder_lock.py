"""One writer per output folder: an exclusive advisory lock (flock) on the folder itself.

Two `index` (or `features`, or `train`) runs writing one folder at once would each name their files from their own
in-memory copy of the folder's record and overwrite each other's. The lock is taken on the folder's own descriptor,
so no lock file is written into a folder we may not own, and the kernel drops it when the process ends, however it
ends (a `kill -9` never leaves a stale lock). Readers (`search`, `info`) take no lock: every file they read is
replaced atomically. On a filesystem without flock support (some network mounts) the lock is skipped.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path


@contextlib.contextmanager
def exclusive_writer(folder: str | os.PathLike, what: str, error: type[Exception]):
    """Hold the folder's lock for the block; another process holding it -> `error` at once (no waiting)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no flock
        yield
        return
    folder = Path(folder)
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise error(
                    f"{folder}: another process is writing this {what} now; wait for it to finish (then run "
                    "again: what it wrote is kept), or give another output folder"
                ) from None
            # ENOLCK / EOPNOTSUPP: this filesystem cannot lock; go on unlocked
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
