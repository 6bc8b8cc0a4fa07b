"""Bad-data reporting shared by the dataset readers.

Every metadata problem is found at construction, for all rows, so a training run never starts on garbage that
would only surface hours later. Strict mode stops at the first bad row with a `DataError` naming the file and the
row (a CSV line number or a JSON key); lax mode skips the row and records why, as the official
`error_bad_lines=False` / `"loading": "lax"` settings intend, but visibly.
"""

from __future__ import annotations

import collections
import os


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


def describe_row(row: int | str) -> str:
    return f"line {row}" if isinstance(row, int) else f"key {row!r}"


class FileCheck:
    """Whether video files exist, each path asked of the file system once (metadata names a chunk many times)."""

    def __init__(self):
        self._known: dict = {}

    def exists(self, path) -> bool:
        if path not in self._known:
            self._known[path] = path.is_file()
        return self._known[path]

    def require(self, path, prefix: str = "") -> None:
        """Raise RowProblem('missing video') unless `path` is a file."""
        if not self.exists(path):
            raise RowProblem("missing video", f"{prefix}{path} does not exist")
