"""What every benchmark shares: a median wall-clock timer, the provenance (git sha, machine) stamped on its results,
and the output folder its JSON, markdown table and PNG plot go to.

Kept apart from the benchmarks themselves (kernels/bench, export/bench.py, bench_e2e.py) so that they time, label
and write their results the same way: the folder is checked before any work (a file, an unwritable folder, or
files of the same names that no benchmark of ours wrote are refused in one line), every file is replaced
atomically, and a result written while the run is still going says so (`"complete": false`).
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO


def times_ms(fn, repeats: int = 7, warmup: int = 1) -> list[float]:
    """Milliseconds of each of `repeats` timed calls of `fn()` after `warmup` untimed ones. repeats < 1 or
    warmup < 0 is a ValueError: no timing is reported from no calls."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"a timing needs repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
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


def machine() -> dict:
    """The host part of a benchmark's machine record: CPU model, logical CPUs, OS, Python."""
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def parse_int_list(text: str, flag: str, low: int = 1) -> list[int]:
    """A comma-separated list of distinct integers >= `low` (`--batches 1,8,32`); anything else is a ValueError that
    names the flag: an empty list, a malformed entry, a value below `low`, or a value given twice (it would time
    the same shape twice and pair the wrong rows when ratios are taken)."""
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"{flag}: {part!r} is not an integer (give a comma-separated list, e.g. 1,8)") from None
        if value < low:
            raise ValueError(f"{flag}: {value} is below {low}")
        if value in values:
            raise ValueError(f"{flag}: {value} is given twice")
        values.append(value)
    return values


def parse_name_list(text: str, flag: str, allowed: Sequence[str] | None = None) -> list[str]:
    """A comma-separated list of distinct names, each from `allowed` when given; empty entries are an error too."""
    names = [part.strip() for part in text.split(",")]
    if any(not n for n in names):
        raise ValueError(f"{flag}: empty entry in {text!r} (give a comma-separated list)")
    unknown = [n for n in names if allowed is not None and n not in allowed]
    if unknown:
        raise ValueError(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{flag}: {', '.join(twice)} given twice")
    return names


class ResultsFolder:
    """The output folder of one benchmark run: `names` are its files, the JSON first, then the markdown table and
    the PNG plot (and any other file the run writes there).

    Used as a context manager around the run, entered before any work: it refuses, in one line (ValueError), an
    --out that is a file or cannot be created or written, and files of these names that the same benchmark did not
    write (its JSON, when present, carries `"benchmark": <name>`; a markdown table or plot is taken as ours only
    beside our JSON); it holds the folder's writer lock, so two runs into one folder do not interleave their files.
    """

    def __init__(self, folder: str | os.PathLike, benchmark: str, names: Sequence[str]):
        self.folder, self.benchmark, self.names = Path(folder), benchmark, tuple(names)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> ResultsFolder:
        folder = self.folder
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--out {folder}: exists and is not a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder, prefix=".egovlp-bench-probe-"):
                pass
        except OSError as exc:
            raise ValueError(f"--out {folder}: cannot write there ({exc.strerror or exc})") from None
        ours = self.is_ours(folder / self.names[0], self.benchmark)
        foreign = [n for n in self.names if os.path.lexists(folder / n) and not (ours and (folder / n).is_file())]
        if foreign:
            raise ValueError(
                f"--out {folder}: {', '.join(foreign)} already there and not written by `bench {self.benchmark}`; "
                "move them away or choose another folder"
            )
        from .folder_lock import exclusive_writer

        self._stack.enter_context(exclusive_writer(folder, "benchmark's results", ValueError))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    @staticmethod
    def is_ours(path: Path, benchmark: str) -> bool:
        """Whether `path` is a results JSON of `benchmark` (results written before the `benchmark` key: an object
        with `meta` and `rows` or `profile`)."""
        from .jsonfile import read_json

        try:
            data = read_json(path)  # a FIFO or a huge file in its place is refused unread
        except ValueError:
            return False
        if not isinstance(data, dict):
            return False
        if "benchmark" in data:
            return data["benchmark"] == benchmark
        return "meta" in data and ("rows" in data or "profile" in data)

    def write(
        self,
        result: dict,
        markdown: str,
        plot: Callable[[Path | BinaryIO], None] | None = None,
        complete: bool = True,
    ) -> None:
        """Replace the JSON (`result` under the keys `benchmark` and `complete`), then the markdown table, then the
        plot (`plot(file)` draws into memory, then the PNG is written), each atomically. An incomplete result (the
        rows so far of a run that is still going) has no plot: a plot of an earlier run beside it is removed, so
        the folder never pairs a table with another run's plot; the markdown table starts with a line saying so.
        Without matplotlib the run still writes its JSON and table, with a one-line note on stderr."""
        from .checkpoint import atomic_write_bytes
        from .jsonfile import json_text

        result = {"benchmark": self.benchmark, "complete": complete, **result}
        json_name, md_name, png_name = self.names[:3]
        if not complete:
            markdown = (
                "**Incomplete: the run was still going (or was stopped) when this was written; these are the rows "
                "measured so far.**\n\n" + markdown
            )
        atomic_write_bytes(self.folder / json_name, (json_text(result, indent=1) + "\n").encode())
        atomic_write_bytes(self.folder / md_name, markdown.encode())
        png = self.folder / png_name
        if plot is None or not complete:
            with contextlib.suppress(FileNotFoundError):
                png.unlink()
            return
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            with contextlib.suppress(FileNotFoundError):
                png.unlink()
            print(f"bench {self.benchmark}: no {png_name}: matplotlib is not installed", file=sys.stderr)
            return
        import io

        from matplotlib import rc_context

        image = io.BytesIO()
        with rc_context({"savefig.format": "png"}):  # the plot functions call savefig(path) with no format
            plot(image)
        atomic_write_bytes(png, image.getvalue())
