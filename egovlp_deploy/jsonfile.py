"""Reading the project's JSON files (configs, export manifests, checkpoint manifests, indexes, question files) with
one named error for every way a file can be bad: missing, unreadable, not UTF-8, not JSON, not the expected kind
of value. Each caller passes its own exception class, so a bad file surfaces as that module's error (ConfigError,
ManifestError, CheckpointError, ...) and never as a bare UnicodeDecodeError or JSONDecodeError.

Torch-free on purpose: the light CLI paths (configs, indexes) import it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

_KINDS = {dict: "a JSON object", list: "a JSON array"}


def json_text(value: Any, **dumps_options) -> str:
    """`value` as standard JSON: a NaN or infinite float (an accuracy over no questions, a skipped step's loss)
    becomes null, where json.dumps would write the bare NaN / Infinity that jq, JavaScript and other strict
    readers refuse."""

    def finite(v):
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), allow_nan=False, **dumps_options)


def read_json(
    path: str | os.PathLike,
    error: type[Exception] = ValueError,
    *,
    expect: type | None = None,
    missing: str | None = None,
) -> Any:
    """The parsed content of `path`; raises `error` naming the file and the problem.

    expect: dict or list, to require that top-level kind. missing: the message when the file does not exist
    (default "<path>: no such file").
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise error(missing or f"{path}: no such file") from exc
    except UnicodeDecodeError as exc:  # a binary or truncated-mid-character file
        raise error(f"{path}: not valid JSON ({exc})") from exc
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:  # names the line and column
        raise error(f"{path}: not valid JSON ({exc})") from exc
    except RecursionError as exc:  # thousands of nested brackets: no file of ours nests deeper than a few levels
        raise error(f"{path}: nested too deeply to be read as JSON") from exc
    if expect is not None and not isinstance(data, expect):
        raise error(f"{path}: expected {_KINDS.get(expect, expect.__name__)}, got {type(data).__name__}")
    return data
