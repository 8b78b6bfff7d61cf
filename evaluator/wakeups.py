"""Filesystem events in, a wake-up out: the only thing watchdog does here.

The handler never trusts an event's content: it only wakes the loop, which re-reads the state file.
TF and this project replace the state file by a rename, so a `moved` event whose destination is
`checkpoint` matters as much as `created` or `modified`.

When the kernel's inotify queue overflows, watchdog only logs a warning (no event reaches a
handler). A filter on that logger turns the warning into a wake-up, so the loop rescans and
reports it in its own format, and keeps the raw line off the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from common.checkpoints import STATE_FILE
from common.errors import UsageError
from common.workdir import DONE_FILE, RUN_FILE

WATCHED_NAMES = frozenset({STATE_FILE, DONE_FILE, RUN_FILE})
_RELEVANT = frozenset({"created", "modified", "moved", "closed"})
OVERFLOW_LOGGER = "watchdog.observers.inotify_c"  # where watchdog 7 reports an overflowed queue


class Wake:
    """A wake-up flag with the time of the latest relevant event."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.last_event = 0.0
        self._overflows = 0
        self._lock = threading.Lock()

    def set(self) -> None:
        self.last_event = time.monotonic()
        self.event.set()

    def overflowed(self) -> None:
        """Events were lost: count it and wake the loop, whose rescan finds what they announced."""
        with self._lock:
            self._overflows += 1
        self.set()

    def take_overflows(self) -> int:
        """How many overflows happened since the last call."""
        with self._lock:
            count, self._overflows = self._overflows, 0
        return count

    def wait(self, timeout: float) -> bool:
        """Wait for a wake-up; return whether one came. Clears the flag."""
        woke = self.event.wait(timeout)
        self.event.clear()
        return woke

    def settle(self, quiet_secs: float, max_secs: float) -> None:
        """Let a burst of events finish: return after `quiet_secs` without one (at most `max_secs`)."""
        deadline = time.monotonic() + max_secs
        while time.monotonic() < deadline:
            remaining = quiet_secs - (time.monotonic() - self.last_event)
            if remaining <= 0:
                break
            time.sleep(min(remaining, deadline - time.monotonic()))
        self.event.clear()


class StateFileHandler(FileSystemEventHandler):
    """Wake the loop when the state file (or run.json, done.json) is created, changed or renamed into place."""

    def __init__(self, wake: Wake) -> None:
        super().__init__()
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _RELEVANT:
            return
        paths = (event.src_path, getattr(event, "dest_path", "") or "")
        if any(os.path.basename(os.fsdecode(p)) in WATCHED_NAMES for p in paths):
            self.wake.set()


class OverflowFilter(logging.Filter):
    """Swallow watchdog's "Inotify queue overflowed" warning and wake the loop instead."""

    def __init__(self, wake: Wake) -> None:
        super().__init__()
        self.wake = wake

    def filter(self, record: logging.LogRecord) -> bool:
        if "queue overflowed" in record.getMessage():
            self.wake.overflowed()
            return False
        return True


@contextlib.contextmanager
def watching(folder: Path, wake: Wake, *, poll: bool, poll_secs: float = 1.0) -> Iterator[None]:
    """Run an observer on `folder` (inotify, or polling with `poll`); stop and join it on exit."""
    observer = PollingObserver(timeout=poll_secs) if poll else Observer()
    overflow = OverflowFilter(wake)
    logger = logging.getLogger(OVERFLOW_LOGGER)
    logger.addFilter(overflow)
    try:
        _start(observer, StateFileHandler(wake), folder)
        try:
            yield
        finally:
            observer.stop()
            observer.join()
    finally:
        logger.removeFilter(overflow)


def _start(observer: BaseObserver, handler: StateFileHandler, folder: Path) -> None:
    """Schedule and start the observer; a one-line error when the system refuses."""
    try:
        observer.schedule(handler, str(folder), recursive=False)
        observer.start()
    except OSError as e:  # the inotify watch or instance limit, a folder that vanished
        raise UsageError(f"cannot watch {folder}: {e.strerror or e} (--poll watches without inotify)") from e
