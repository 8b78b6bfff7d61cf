"""Crash-safe file writes: a temp file in the same folder, fsync, then an atomic rename."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"  # every temp file this project writes has this in its name


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's (or a folder's) contents to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    target = Path(path)
    tmp = target.with_name(f"{target.name}{TMP_MARK}{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    # The rename is durable only once the folder entry is.
    fsync_path(target.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 text atomically (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def leftover_temp_files(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield temp files that an interrupted atomic write left in `folder`."""
    root = Path(folder)
    if root.is_dir():
        yield from (p for p in root.iterdir() if TMP_MARK in p.name and p.is_file())
