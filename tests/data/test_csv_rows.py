"""csv_records: a byte that is not UTF-8 is reported on its own line (and lax mode skips only that row), not as an
unreadable header."""

from __future__ import annotations

import pytest

from egovlp_deploy.data import DataError
from egovlp_deploy.data.csv_rows import csv_records
from egovlp_deploy.data.errors import RowFilter


def write(tmp_path, lines: list[bytes]):
    path = tmp_path / "rows.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


ROWS = [b"name,value"] + [f"row{i},{i}".encode() for i in range(2, 8)] + [b"caf\xe9,8"] + [b"row9,9", b"row10,10"]


def test_a_bad_byte_on_line_8_is_reported_on_line_8(tmp_path):
    path = write(tmp_path, ROWS)
    with pytest.raises(DataError) as caught:
        list(csv_records(path, RowFilter(path, strict=True), ("name", "value")))
    assert str(caught.value) == f"{path}: line 8: malformed row: not UTF-8: byte 0xe9 in field 1"


def test_lax_mode_skips_only_the_row_with_the_bad_byte(tmp_path):
    path = write(tmp_path, ROWS)
    rows = RowFilter(path, strict=False)
    records = csv_records(path, rows, ("name", "value"))
    got = [(line, position, fields["value"]) for line, position, fields in records]
    assert got == [(i, i - 2, str(i)) for i in (2, 3, 4, 5, 6, 7, 9, 10)]
    assert records.data_rows == 9  # the rejected row keeps its position
    assert rows.skipped_rows == [(8, "malformed row: not UTF-8: byte 0xe9 in field 1")]


def test_a_bad_byte_in_the_header_is_fatal_in_any_mode(tmp_path):
    path = write(tmp_path, [b"name,val\xffue", b"a,1"])
    with pytest.raises(DataError, match=r"line 1: unreadable header: not UTF-8: byte 0xff in field 2"):
        list(csv_records(path, RowFilter(path, strict=False), ("name",)))


def test_utf8_text_is_read_as_is(tmp_path):
    path = write(tmp_path, [b"name,value", "café,1".encode()])
    assert [f for _, _, f in csv_records(path, RowFilter(path, strict=True), ("name",))] == [
        {"name": "café", "value": "1"}
    ]
