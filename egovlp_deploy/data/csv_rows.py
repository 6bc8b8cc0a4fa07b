"""Reading a metadata CSV row by row with the strict/lax rule of `RowFilter`: one place for the header checks and
for what counts as a malformed row, shared by the EgoClip, EK-100 and Charades-Ego readers."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator

from .errors import RowFilter, RowProblem


class csv_records:  # named like a function: it is used like a generator function
    """Iterate (line number, data-row position, fields) over the well-formed rows of a metadata CSV.

    A file that cannot be opened, has no header or lacks a `required` column fails (raises) in any mode; a row that
    cannot be parsed or has the wrong number of fields is rejected through `rows` (raise in strict mode, record in
    lax mode). Rejected rows still count as data rows (`data_rows`, positions), which EK-100 needs: a data row's
    position is its row of the relevancy matrix. Blank lines are no data rows, as for the official pandas readers.
    `one_line`: every row of the format is one line (EgoClip, EK-100), so a quoted field that runs on to a later line
    is an unbalanced quote, fatal in any mode: csv.reader joins the lines up to the next quote into that one field,
    and the rows on them would vanish inside it (as a narration, say) without a trace.
    `key`: a required column whose value `keys` collects for every data row split into fields, the malformed rows
    that reach that column included (EK-100: a skipped row's narration id still names a row of the file).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        rows: RowFilter,
        required: tuple[str, ...],
        delimiter: str = ",",
        quoting: int = csv.QUOTE_MINIMAL,
        hint: str = "",
        one_line: bool = False,
        key: str | None = None,
    ):
        self.path, self.rows, self.required = path, rows, required
        self.delimiter, self.quoting, self.hint, self.one_line = delimiter, quoting, hint, one_line
        self.key = key
        self.data_rows = 0
        self.keys: set[str] = set()

    def __iter__(self) -> Iterator[tuple[int, int, dict[str, str]]]:
        rows = self.rows
        try:
            # surrogateescape: a byte that is not UTF-8 stays in its row (as a lone surrogate) instead of failing the
            # whole read buffer, so it is reported on its own line and lax mode skips only that row; utf-8-sig drops a
            # byte-order mark (spreadsheet exports), which would otherwise glue itself to the first column's name
            f = open(self.path, newline="", encoding="utf-8-sig", errors="surrogateescape")
        except OSError as e:
            raise rows.fail("open", str(e)) from e
        with f:
            lines = _Lines(f)
            reader = csv.reader(lines, delimiter=self.delimiter, quoting=self.quoting)
            try:
                header = next(reader, None)
            except csv.Error as e:
                raise rows.fail(f"line {reader.line_num}", f"unreadable header: {e}") from e
            if header is None:
                raise rows.fail("line 1", "the file is empty (no header)")
            bad = _not_utf8(header)
            if bad:
                raise rows.fail(f"line {reader.line_num}", f"unreadable header: {bad}")
            missing = [c for c in self.required if c not in header]
            if missing:
                raise rows.fail("line 1", f"missing columns {missing}{self.hint}; header: {header}")
            # a row becomes {column: value}, where a repeated name keeps only its last value (pandas reads the first)
            twice = [c for c in self.required if header.count(c) > 1]
            if twice:
                raise rows.fail("line 1", f"columns {twice} appear more than once; header: {header}")
            key_index = None if self.key is None else header.index(self.key)
            while True:
                first_line = reader.line_num + 1
                try:
                    values = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    if self.one_line and reader.line_num > first_line:
                        # an open quote read on until the field grew past csv's size limit
                        raise rows.fail(
                            f"line {first_line}", f"a quoted field runs on to line {reader.line_num} ({e})"
                        ) from e
                    self.data_rows += 1
                    rows.reject(reader.line_num, RowProblem("malformed row", str(e)))
                    continue
                if lines.exhausted:
                    # csv.reader ends a quoted field that is never closed at the end of the file, so that field holds
                    # every later line: fatal in any mode, as those rows would vanish without a trace
                    raise rows.fail(f"line {first_line}", "a quoted field is not closed before the end of the file")
                if not values:
                    continue  # a blank line is no row (pandas' skip_blank_lines): it takes no data-row position
                if self.one_line and reader.line_num > first_line:
                    raise rows.fail(
                        f"line {first_line}",
                        f"a quoted field runs on to line {reader.line_num} (an unbalanced quote?), "
                        "but each row of this file is one line",
                    )
                self.data_rows += 1
                if key_index is not None and key_index < len(values):
                    self.keys.add(values[key_index])
                bad = _not_utf8(values)
                if bad:
                    rows.reject(reader.line_num, RowProblem("malformed row", bad))
                    continue
                if len(values) != len(header):
                    rows.reject(
                        reader.line_num,
                        RowProblem("malformed row", f"{len(values)} fields, the header has {len(header)}"),
                    )
                    continue
                yield reader.line_num, self.data_rows - 1, dict(zip(header, values))


class _Lines:
    """A text file's lines, noting when csv.reader asks past the last one (it does so only inside a quoted field)."""

    def __init__(self, f):
        self._lines, self.exhausted = iter(f), False

    def __iter__(self):
        return self

    def __next__(self) -> str:
        try:
            return next(self._lines)
        except StopIteration:
            self.exhausted = True
            raise


def _not_utf8(values: list[str]) -> str | None:
    """Why a row read with errors='surrogateescape' is not UTF-8 (its first undecodable byte), or None."""
    for column, value in enumerate(values, 1):
        for ch in value:
            if "\udc80" <= ch <= "\udcff":
                return f"not UTF-8: byte 0x{ord(ch) - 0xDC00:02x} in field {column}"
    return None
