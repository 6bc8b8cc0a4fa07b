"""Compile-cache folders that can be written, whatever the environment points them to.

torch creates its inductor cache folder (TORCHINDUCTOR_CACHE_DIR, else <tmp>/torchinductor_<user>) as soon as
torch._dynamo is imported, which even a meta-device forward, `torch.export` or a training step does: an unwritable
TORCHINDUCTOR_CACHE_DIR fails every command with a bare "Permission denied". Triton keeps its kernels in
TRITON_CACHE_DIR, else in TRITON_HOME or the home folder (~/.triton/cache), and fails its first compile where that
cannot be created (a read-only HOME). `usable_cache_dirs` points each such variable to a fresh temporary folder for
this run instead, with a one-line note where the user set the variable; a cache that can be written is left as it
is, and nothing is created here (a command that never compiles leaves no cache folder behind).

Torch-free: the CLI calls it before any command imports torch.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def _problem(path: str) -> str | None:
    """Why `path` cannot serve as a cache folder, or None: the nearest existing folder on its way must be a folder
    this process can write (nothing is created)."""
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def _triton_default(environ) -> str:
    return os.path.join(environ.get("TRITON_HOME") or os.path.expanduser("~/"), ".triton", "cache")


def usable_cache_dirs(environ=None, note=None) -> dict[str, str]:
    """Point every compile-cache variable whose folder cannot be written to a new temporary folder (deleted when
    the process ends); returns {variable: folder} of those changed. `note(text)` reports each (default: stderr)."""
    environ = os.environ if environ is None else environ
    note = note or (lambda text: print(text, file=sys.stderr))
    changed = {}
    for var in VARIABLES:
        given = environ.get(var)
        if given:  # checked without creating it: a command that never compiles leaves no folder behind
            why, where = _problem(given), f"{var}={given}"
        elif var == "TRITON_CACHE_DIR":  # Triton's own default, checked likewise
            why, where = _problem(_triton_default(environ)), None
        else:
            continue  # torch's default lies in the temp folder, which tempfile finds writable
        if why is None:
            continue
        try:
            folder = tempfile.mkdtemp(prefix=f"egovlp-{var.lower().replace('_', '-')}-")
        except OSError:
            continue  # no writable temp folder either: torch or Triton will name the folder that fails
        atexit.register(shutil.rmtree, folder, True)
        environ[var] = folder
        changed[var] = folder
        if where:  # a folder the user chose is worth a note; Triton's default (a read-only HOME) is replaced quietly
            note(f"note: {where} cannot be written ({why}); using {folder} for this run")
    return changed
