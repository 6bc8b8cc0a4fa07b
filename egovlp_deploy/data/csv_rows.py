"""Reading a metadata CSV row by row with the strict/lax rule of `RowFilter`: one place for the header checks and
for what counts as a malformed row, shared by the EgoClip, EK-100 and Charades-Ego readers."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator

from .errors import RowFilter, RowProblem


class csv_records:  # noqa: N801 -- used like a generator function
    """Iterate (line number, data-row position, fields) over the well-formed rows of a metadata CSV.

    A file that cannot be opened, has no header or lacks a `required` column fails (raises) in any mode; a row that
    cannot be parsed or has the wrong number of fields is rejected through `rows` (raise in strict mode, record in
    lax mode). Rejected rows still count as data rows (`data_rows`, positions), which EK-100 needs: a data row's
    position is its row of the relevancy matrix.
    """

    def __init__(self, path: str | os.PathLike, rows: RowFilter, required: tuple[str, ...], delimiter: str = ",",
                 quoting: int = csv.QUOTE_MINIMAL, hint: str = ""):
        self.path, self.rows, self.required = path, rows, required
        self.delimiter, self.quoting, self.hint = delimiter, quoting, hint
        self.data_rows = 0

    def __iter__(self) -> Iterator[tuple[int, int, dict[str, str]]]:
        rows = self.rows
        try:
            f = open(self.path, newline="", encoding="utf-8")
        except OSError as e:
            raise rows.fail("open", str(e)) from e
        with f:
            reader = csv.reader(f, delimiter=self.delimiter, quoting=self.quoting)
            try:
                header = next(reader, None)
            except (csv.Error, UnicodeDecodeError) as e:
                raise rows.fail("line 1", f"unreadable header: {e}") from e
            if header is None:
                raise rows.fail("line 1", "the file is empty (no header)")
            missing = [c for c in self.required if c not in header]
            if missing:
                raise rows.fail("line 1", f"missing columns {missing}{self.hint}; header: {header}")
            while True:
                try:
                    values = next(reader)
                except StopIteration:
                    return
                except (csv.Error, UnicodeDecodeError) as e:
                    self.data_rows += 1
                    rows.reject(reader.line_num, RowProblem("malformed row", str(e)))
                    continue
                self.data_rows += 1
                if len(values) != len(header):
                    rows.reject(reader.line_num,
                                RowProblem("malformed row", f"{len(values)} fields, the header has {len(header)}"))
                    continue
                yield reader.line_num, self.data_rows - 1, dict(zip(header, values))
