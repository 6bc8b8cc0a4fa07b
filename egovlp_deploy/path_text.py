"""File paths as text: stored in UTF-8 formats (JSON, safetensors metadata) and shown on a terminal line.

A POSIX file name is bytes; Python decodes the ones that are not UTF-8 to lone surrogates (os.fsdecode), which no
UTF-8 writer accepts, and a file name may hold a newline, which would split a line of output in two.
"""

from __future__ import annotations

import os


def utf8_path(path: str) -> str:
    """A path as UTF-8 text (JSON, safetensors metadata): bytes of a file name that are not UTF-8 (os.fsdecode's
    surrogates) as \\x escapes."""
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte (text from JSON escapes, not a file name)
        raw = path.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def printable(text: str) -> str:
    """A file name, query or label for a terminal line: `utf8_path`, with control and format characters (a newline
    would split the line, an escape sequence would drive the terminal, a direction override would reorder it) as
    escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in utf8_path(text))


def some_names(names: list[str], limit: int = 5) -> str:
    """The first `limit` names, `printable`, then how many more: "a, b, c and 4 more"."""
    shown = ", ".join(printable(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
