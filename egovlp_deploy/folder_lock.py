"""One writer per output folder: an exclusive advisory lock (flock) on the folder itself.

Two `index` (or `features`, or `train`) runs writing one folder at once would each name their files from their own
in-memory copy of the folder's record and overwrite each other's. The lock is taken on the folder's own descriptor,
so no lock file is written into a folder we may not own, and the kernel drops it when the process ends, however it
ends (a `kill -9` never leaves a stale lock). Readers (`search`, `info`) take no lock: every file they read is
replaced atomically. On a filesystem without flock support (some network mounts) the lock is skipped. A forked
child (a DataLoader worker, which may outlive a killed parent by seconds) closes its copy of the descriptor at once,
so it never keeps the folder locked against the rerun.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

_HELD: set[int] = set()  # the descriptors holding a lock in this process


def _close_in_child() -> None:
    """After a fork, in the child: close its copies of the held descriptors (the parent's lock stays held)."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def try_exclusive_lock(fd: int) -> bool:
    """Take an exclusive advisory lock on the open descriptor `fd` without waiting: False where another process
    holds it; True once held, or where it cannot be locked at all (not POSIX, or a filesystem without flock support:
    used unlocked)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no flock
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        # ENOLCK / EOPNOTSUPP: this filesystem cannot lock; go on unlocked
    return True


@contextlib.contextmanager
def exclusive_writer(
    folder: str | os.PathLike, what: str, error: type[Exception], then: str = "run again: what it wrote is kept"
):
    """Hold the folder's lock for the block; another process holding it -> `error` at once (no waiting), saying
    what to do `then`, once that process is done."""
    try:
        import fcntl  # noqa: F401  (not POSIX: no flock, and no folder to open for one)
    except ImportError:
        yield
        return
    folder = Path(folder)
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    _HELD.add(fd)
    try:
        if not try_exclusive_lock(fd):
            raise error(
                f"{folder}: another process is writing this {what} now; wait for it to finish (then {then}), "
                "or give another output folder"
            )
        yield
    finally:
        _HELD.discard(fd)
        os.close(fd)  # closing the descriptor releases the lock
