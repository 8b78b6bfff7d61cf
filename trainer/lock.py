"""One trainer per workdir: an exclusive lock on `trainer.lock` (see `Storage.lock`), released on any exit."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from types import TracebackType

from common.errors import UsageError, WorkdirIOError
from common.storage import Locked, Storage

LOCK_FILE = "trainer.lock"


class WorkdirLock:
    """Hold the workdir's trainer lock for the life of a `with` block."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._held = contextlib.ExitStack()

    def __enter__(self) -> WorkdirLock:
        note = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        try:
            self._held.enter_context(self.storage.lock(LOCK_FILE, wait=False, note=note))
        except Locked as holder:
            raise UsageError(f"{self.storage.root}: another trainer is running on this workdir ({holder})") from None
        except OSError as e:  # a full or read-only disk: the lock file cannot be written
            raise WorkdirIOError(f"{self.storage.root}: cannot take the trainer lock ({e.strerror or e})") from e
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self._held.close()
