"""File paths as text: stored in UTF-8 formats (JSON, safetensors metadata) and shown on a terminal line.

A POSIX file name is bytes; Python decodes the ones that are not UTF-8 to lone surrogates (os.fsdecode), which no
UTF-8 writer accepts, and a file name may hold a newline, which would split a line of output in two.
"""

from __future__ import annotations

import os


def utf8_path(path: str) -> str:
    """A path as UTF-8 text (JSON, safetensors metadata): bytes of a file name that are not UTF-8 (os.fsdecode's
    surrogates) as \\x escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def printable(text: str) -> str:
    """A file name for a terminal line: `utf8_path`, with control characters (a newline in a file name would split
    the line) as escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in utf8_path(text))
