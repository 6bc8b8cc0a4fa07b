"""argparse types shared by the commands: a bad value is refused by the parser (one line, exit 2), before anything
is read or written, and a negative count is never read as 'off' or as a Python slice from the end."""

from __future__ import annotations

import argparse


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {low} or more, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (a count where 0 means none, e.g. --rerank)."""
    return _int_at_least(text, 0)


def positive_int(text: str) -> int:
    """An integer >= 1 (a batch, a commit size, a number of questions)."""
    return _int_at_least(text, 1)
