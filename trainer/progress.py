"""Displays of training progress. They consume metric dicts; the loop never formats anything."""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def log_line(event: str, **fields: Any) -> str:
    """The one greppable format of the trainer's plain output: `trainer <event> key=value ...`."""
    parts = [f"{k}={_fmt(v)}" for k, v in fields.items()]
    return " ".join([time.strftime("%Y-%m-%dT%H:%M:%S"), "trainer", event, *parts])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Reporter(Protocol):
    """What the training loop talks to."""

    def start(self, *, first_step: int, total_steps: int) -> None: ...
    def update(self, metrics: dict[str, float]) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


class PlainLog:
    """One line every `every` steps, for logs and pipes."""

    def __init__(self, every: int, stream: Any = None) -> None:
        self.every = every
        self.stream = stream or sys.stdout
        self._next = 0
        self._total = 0

    def start(self, *, first_step: int, total_steps: int) -> None:
        self._next = (first_step // self.every + 1) * self.every
        self._total = total_steps

    def update(self, metrics: dict[str, float]) -> None:
        step = int(metrics["step"])
        if step < self._next and step < self._total:
            return
        self._next = (step // self.every + 1) * self.every
        print(log_line("progress", **metrics), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class RichBar:
    """A live bar with step, steps/s, loss and ETA, for a terminal."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>7.1f} steps/s"), TextColumn("loss {task.fields[loss]:.4f}"),
            TimeRemainingColumn(), console=self.console, transient=False,
        )
        self._task: Any = None

    def start(self, *, first_step: int, total_steps: int) -> None:
        self.progress.start()
        self._task = self.progress.add_task("train", total=total_steps, completed=first_step, rate=0.0,
                                            loss=float("nan"))

    def update(self, metrics: dict[str, float]) -> None:
        self.progress.update(self._task, completed=metrics["step"], rate=metrics["steps_per_sec"],
                             loss=metrics["loss"])

    def message(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self.progress.stop()


def make_reporter(kind: str, log_every: int) -> Reporter:
    """`rich` on a terminal (or when asked), else plain lines."""
    if kind == "rich" or (kind == "auto" and sys.stdout.isatty()):
        return RichBar()
    return PlainLog(log_every)
