"""Crash-safe file writing: temp name, fsync, atomic rename. A file under its final name is always complete."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def fsync_rename(tmp: Path, final: Path) -> None:
    """Flush `tmp` to disk and rename it to `final` (atomic on POSIX within one filesystem)."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to `path` through a temp name, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(data)
    fsync_rename(tmp, path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
