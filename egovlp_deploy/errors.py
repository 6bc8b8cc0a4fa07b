"""Exceptions told in one line, for error messages and results tables (a message may be empty, or start with a
newline, or carry a long native stack trace after its first line)."""

from __future__ import annotations


def error_line(exc: BaseException, limit: int = 200) -> str:
    """`Type: first non-empty line of the message`, the line cut to `limit` characters."""
    line = next((x.strip() for x in str(exc).splitlines() if x.strip()), "")
    return f"{type(exc).__name__}: {line[:limit]}".rstrip()
