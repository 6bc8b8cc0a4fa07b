"""Bad-data reporting shared by the dataset readers.

Every metadata problem is found at construction, for all rows, so a training run never starts on garbage that
would only surface hours later. Strict mode stops at the first bad row with a `DataError` naming the file and the
row (a CSV line number or a JSON key); lax mode skips the row and records why, as the official
`error_bad_lines=False` / `"loading": "lax"` settings intend, but visibly.
"""

from __future__ import annotations

import collections
import os
import stat

from ..path_text import printable


class DataError(ValueError):
    """A dataset file or one of its rows is unusable. The message names the file and the row or key."""

    def __init__(self, path: str | os.PathLike, where: str | None = None, reason: str | None = None):
        if where is None and reason is None:  # DataError(message): how DataLoader workers re-raise it
            super().__init__(str(path))
            self.path = self.where = self.reason = None
            return
        self.path, self.where, self.reason = str(path), where, reason
        super().__init__(f"{path}: {where}: {reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.where, self.reason) if self.where is not None else (str(self),))


class RowProblem(ValueError):
    """One row's problem, raised by a row parser that does not know the file or row; `kind` groups the counts."""

    def __init__(self, kind: str, detail: str):
        self.kind, self.detail = kind, detail
        super().__init__(f"{kind}: {detail}")


class RowFilter:
    """The strict/lax policy for bad metadata rows of one file.

    `reject(row, problem)` raises `DataError` in strict mode; in lax mode it appends `(row, reason)` to
    `skipped_rows` (row: the CSV line number as an int, or the JSON key as a str) and counts `problem.kind`.
    """

    def __init__(self, path: str | os.PathLike, strict: bool):
        self.path, self.strict = str(path), strict
        self.skipped_rows: list[tuple[int | str, str]] = []
        self.counts: collections.Counter[str] = collections.Counter()

    def reject(self, row: int | str, problem: RowProblem) -> None:
        if self.strict:
            raise DataError(self.path, describe_row(row), str(problem)) from problem
        self.skipped_rows.append((row, str(problem)))
        self.counts[problem.kind] += 1

    def fail(self, where: str, reason: str) -> DataError:
        """A whole-file problem (no header, no usable row): always fatal, lax or not."""
        return DataError(self.path, where, reason)

    def none_usable(self, where: str = "all rows", noun: str = "row") -> DataError:
        """No row was usable: fatal, lax or not, naming the first skipped row's problem (often every row's)."""
        reason = f"no usable {noun} ({len(self.skipped_rows)} skipped"
        if self.skipped_rows:
            row, why = self.skipped_rows[0]
            reason += f"; the first, {describe_row(row)}: {why}"
        return self.fail(where, reason + ")")


def describe_row(row: int | str) -> str:
    return f"line {row}" if isinstance(row, int) else f"key {row!r}"


class FileCheck:
    """Whether video files are usable, each path asked of the file system once (metadata names a chunk many times).

    Found at construction, so a strict run stops before its first step rather than at the row hours in: a missing
    file, a dangling or looping symbolic link, a folder named like a video, and an empty (0-byte) file, which an
    interrupted copy or download leaves and no decoder can open. A file that is there but damaged inside is found
    only when it is decoded.
    """

    def __init__(self):
        self._known: dict = {}
        self._listings: dict = {}

    def problem(self, path) -> RowProblem | None:
        """Why `path` is no usable video file, or None."""
        if path not in self._known:
            self._known[path] = self._problem(path)
        return self._known[path]

    def require(self, path, prefix: str = "") -> None:
        """Raise the RowProblem ('missing video', 'bad video file') of `path`, if it has one."""
        problem = self.problem(path)
        if problem is not None:
            # printable: a control character from the metadata (a NUL of a damaged file) shows as an escape
            raise RowProblem(problem.kind, f"{prefix}{printable(str(path))} {problem.detail}")

    def _problem(self, path) -> RowProblem | None:
        try:
            st = path.stat()
        except (OSError, ValueError):  # ValueError: a NUL byte in the name
            if path.is_symlink():
                return RowProblem("missing video", "is a symbolic link to nothing (a missing target or a loop)")
            return RowProblem("missing video", f"does not exist{self._case_hint(path) or self._whole_hint(path)}")
        if stat.S_ISDIR(st.st_mode):
            return RowProblem("bad video file", "is a folder, not a video file")
        if not stat.S_ISREG(st.st_mode):
            return RowProblem("bad video file", "is not a regular file")
        if st.st_size == 0:
            return RowProblem("bad video file", "is empty (0 bytes)")
        return None

    @staticmethod
    def _whole_hint(path) -> str:
        """' (UID.mp4 is there: ...)' for a chunk UID/N.mp4 of a video that is there uncut (Ego4D's own layout)."""
        whole = path.parent.with_name(path.parent.name + path.suffix)
        if path.parent.is_dir() or not whole.is_file():
            return ""
        return (
            f" ({whole.name} is there, uncut: this layout reads each video as 600 s chunks {path.parent.name}/0.mp4, "
            f"{path.parent.name}/1.mp4, ...; see docs/data.md)"
        )

    def _case_hint(self, path) -> str:
        """' (NAME is there: ...)' when the folder holds the name in other letter case (P01_01.mp4 for .MP4)."""
        parent = path.parent
        if parent not in self._listings:
            try:
                names = os.listdir(parent)
            except (OSError, ValueError):
                names = []
            self._listings[parent] = {name.casefold(): name for name in names}
        other = self._listings[parent].get(path.name.casefold())
        return f" ({other} is there: the metadata names it in other letter case)" if other else ""
