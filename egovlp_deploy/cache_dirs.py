"""Compile-cache folders that can be written, whatever the environment points them to.

torch creates its inductor cache folder (TORCHINDUCTOR_CACHE_DIR, else <tmp>/torchinductor_<user>) as soon as
torch._dynamo is imported, which even a meta-device forward, `torch.export` or a training step does: an unwritable
TORCHINDUCTOR_CACHE_DIR fails every command with a bare "Permission denied". Triton keeps its kernels in
TRITON_CACHE_DIR, else in TRITON_HOME or the home folder (~/.triton/cache), and fails its first compile where that
cannot be created (a read-only HOME). `usable_cache_dirs` points each such variable to a fresh temporary folder for
this run instead, with a one-line note where the user set the variable; a cache that can be written is left as it
is, and nothing is created where the variable is unset.

Torch-free: the CLI calls it before any command imports torch.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def _problem(path: str, create: bool) -> str | None:
    """Why `path` cannot serve as a cache folder, or None. create=False only checks that the nearest existing
    folder on the way is writable (nothing is created)."""
    path = os.path.abspath(path)
    if create:
        try:
            os.makedirs(path, exist_ok=True)
            with tempfile.TemporaryFile(dir=path, prefix=".egovlp-probe-"):
                pass
        except OSError as exc:
            return exc.strerror or str(exc)
        return None
    probe = path
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
        if given:
            why, where = _problem(given, create=True), f"{var}={given}"
        elif var == "TRITON_CACHE_DIR":  # Triton's own default, checked without creating it
            why, where = _problem(_triton_default(environ), create=False), None
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
