"""What every benchmark shares: a median wall-clock timer and the provenance (git sha) stamped on its results.

Kept apart from the benchmarks themselves (kernels/bench, export/bench.py, bench_e2e.py) so that they time and
label their rows the same way.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from pathlib import Path


def times_ms(fn, repeats: int = 7, warmup: int = 1) -> list[float]:
    """Milliseconds of each of `repeats` timed calls of `fn()` (at least one) after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median_ms(fn, repeats: int = 7, warmup: int = 1) -> float:
    """Median milliseconds of `repeats` timed calls of `fn()` after `warmup` untimed ones."""
    return float(statistics.median(times_ms(fn, repeats, warmup)))


def git_sha(short: bool = True) -> str:
    """The checkout's commit (+dirty when tracked files changed), looked up from the working directory and then from
    this file's folder; 'unknown' outside a git checkout (an installed wheel run elsewhere). EGOVLP_GIT_SHA, when
    set, wins: a script that runs an installed copy away from the checkout (scripts/gpu_check.sh) stamps it."""
    if os.environ.get("EGOVLP_GIT_SHA"):
        return os.environ["EGOVLP_GIT_SHA"]
    for cwd in (Path.cwd(), Path(__file__).resolve().parent):
        try:
            sha = subprocess.run(
                ["git", "rev-parse", *(["--short"] if short else []), "HEAD"],
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=10,
            )
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if sha.returncode == 0 and sha.stdout.strip():
            return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    return "unknown"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; platform's guess elsewhere), for a benchmark's machine record."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
