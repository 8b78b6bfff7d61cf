"""A private local folder copied into a bucket workdir: for files only a local disk can take (TensorBoard logs).

TensorFlow writes event files through its own file system, which cannot reach S3 at all and
cannot be pointed at a GCS emulator (docs/storage.md). So the writer writes into a local folder,
and `MirroredFolder.sync` puts each file that grew under the workdir's key, at most every
`every_secs` and at `close`. An event file is only appended to, so a reader of the copy sees a
shorter log, never a broken one. A failed upload is a warning: logs never stop a run.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from common.storage.api import Storage

LOCAL_PREFIX = "ckpt-watch-"  # <tmp>/ckpt-watch-mirror-<pid>-<id>/ (objectstore's clean removes dead pids' ones)
log = logging.getLogger("ckpt_watch.bucket")


class MirroredFolder:
    """A local folder (`path`) whose files go to `storage` under `key/` now and then, and at `close`."""

    def __init__(self, storage: Storage, key: str, *, every_secs: float = 30.0) -> None:
        if every_secs < 0:
            raise ValueError(f"every_secs ({every_secs}) must not be negative")
        self.storage, self.key, self.every_secs = storage, key.strip("/"), every_secs
        self.path = Path(tempfile.mkdtemp(prefix=f"{LOCAL_PREFIX}mirror-{os.getpid()}-"))
        self._sizes: dict[str, int] = {}  # what was uploaded of each file
        self._last = time.monotonic()
        self.uploads = 0

    def due(self) -> bool:
        """Whether `every_secs` have passed since the last sync."""
        return time.monotonic() - self._last >= self.every_secs

    def sync(self) -> None:
        """Upload each file that changed since the last sync (a failure is logged, and tried again next time)."""
        self._last = time.monotonic()
        for file in sorted(p for p in self.path.rglob("*") if p.is_file()):
            rel = file.relative_to(self.path).as_posix()
            size = file.stat().st_size
            if self._sizes.get(rel) == size:
                continue
            try:
                self.storage.write(f"{self.key}/{rel}", file.read_bytes())
            except OSError as e:
                log.warning("cannot copy %s to %s: %s", file.name, self.storage.describe(f"{self.key}/{rel}"),
                            e.strerror or e)
                continue
            self._sizes[rel] = size
            self.uploads += 1

    def close(self) -> None:
        """A last sync, then the local folder goes."""
        try:
            self.sync()
        finally:
            shutil.rmtree(self.path, ignore_errors=True)
