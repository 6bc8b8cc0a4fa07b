"""sha256 of files, read in 1 MiB blocks: the one digest every manifest of the project records."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path


def sha256_file(path: str | os.PathLike, offset: int = 0) -> str:
    """The hex sha256 of the file's bytes from `offset` to its end."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# The files that identify a checkpoint directory (its weights and configs).
CHECKPOINT_SUFFIXES = (".safetensors", ".json")


def sha256_tree(
    path: str | os.PathLike,
    suffixes: tuple[str, ...] = CHECKPOINT_SUFFIXES,
    known: Mapping[str, str] | None = None,
) -> str:
    """A file's sha256, or for a directory the sha256 of the sorted `name sha256` lines of its files with these
    suffixes (a checkpoint directory: weights and configs). `known` holds the sha256 of files just verified against
    a manifest, by name: they are not read again."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    known = known or {}
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in suffixes)
    listing = "\n".join(f"{p.name} {known.get(p.name) or sha256_file(p)}" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()
