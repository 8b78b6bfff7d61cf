"""Change notices in, a wake-up out: the storage's notifier (`Storage.watch`) sets a `Wake`.

A notice never carries content: it only wakes the loop, which re-reads the state file. When
notices may have been lost (locally: the kernel's inotify queue overflowed, which watchdog only
logs), the wake-up is counted as an overflow, so the loop rescans and reports it in its own format.

A bucket workdir is polled for the state file alone, one metadata request per poll: the trainer
commits the state file again after it writes done.json there (`checkpoints.announce`), and the
first commit follows run.json, so no change the loop acts on goes unnoticed.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from common.checkpoint.checkpoints import STATE_FILE
from common.layout import DONE_FILE, RUN_FILE
from common.storage import Storage

WATCHED_NAMES = frozenset({STATE_FILE, DONE_FILE, RUN_FILE})


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


@contextlib.contextmanager
def watching(storage: Storage, wake: Wake, *, poll: bool, poll_secs: float = 1.0) -> Iterator[None]:
    """Wake the loop whenever the state file (or run.json, done.json) may have changed (see `Storage.watch`).

    A storage that `polls_state_file_only` (a bucket) watches the state file of these names alone.
    """
    with storage.watch(WATCHED_NAMES, wake.set, on_lost=wake.overflowed, poll=poll, poll_secs=poll_secs):
        yield
