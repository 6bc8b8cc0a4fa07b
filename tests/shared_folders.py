"""Folders built once per test run and shared by pytest-xdist's workers, which would otherwise each build their own
(the tiny export takes ~1.5 min on 2 loaded cores). Tests read them; a test that changes files copies the folder
first, and the root conftest fails the run when a shared folder changed (`changed_shared_folders`)."""

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

_LISTINGS: dict[Path, list] = {}


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> tuple[Path, object]:
    """(folder, what `build(folder)` returned, through JSON) for the folder `name` of this test run: the first worker
    to ask builds it while the others wait on a file lock. A build that raised is tried again by the next asker."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder, built = root / f"shared-{name}", root / f"shared-{name}.built.json"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a build that raised left behind
            folder.mkdir()
            built.write_text(json.dumps(build(folder)))
    _LISTINGS.setdefault(folder, _listing(folder))
    return folder, json.loads(built.read_text())


def changed_shared_folders() -> list[str]:
    """The shared folders this process used whose files changed since it first used them."""
    return [str(folder) for folder, listing in _LISTINGS.items() if _listing(folder) != listing]


def _listing(folder: Path) -> list:
    files = (p for p in folder.rglob("*") if p.is_file())
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
