"""Crash-safe local file writes: a temp file in the same folder, fsync, then an atomic rename.

A workdir is written through `common.storage`; these are what its local implementation uses, and
what writes to other local folders (an export) use directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
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


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))
