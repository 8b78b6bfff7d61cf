"""One trainer per workdir: an exclusive `flock` on `trainer.lock`, released by the kernel on any exit."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from common.errors import UsageError

LOCK_FILE = "trainer.lock"


class WorkdirLock:
    """Hold the workdir's trainer lock for the life of a `with` block."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown process"
            os.close(fd)
            raise UsageError(f"{self.path.parent}: another trainer is running on this workdir ({holder})") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock; the file stays for the next trainer
            self._fd = None
