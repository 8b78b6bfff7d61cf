"""SIGINT/SIGTERM become a stop request that a loop honours at its next safe point."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any


class StopRequest:
    """Set by a signal handler (or a test); read by a loop. `on_set` callbacks wake sleepers."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.finish = False  # True: end as if done (an early stop); False: just stop (a signal)
        self.on_set: list[Callable[[], None]] = []

    def set(self, reason: str, *, finish: bool = False) -> None:
        if self.reason is None:
            self.reason = reason
            self.finish = finish
        for callback in self.on_set:
            callback()

    def __bool__(self) -> bool:
        return self.reason is not None


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[StopRequest]:
    """Route SIGINT and SIGTERM to `stop` for the duration of the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, _frame: Any) -> None:
        stop.set(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
