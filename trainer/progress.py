"""Displays of training progress. They consume metric dicts; the loop never formats anything."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from common.run.protocol import SPENT_KEY, StopRequestId, TrainerHeartbeat
from common.storage import Storage
from common.storage.mirror import MirroredFolder


def log_line(event: str, **fields: Any) -> str:
    """The one greppable format of the trainer's plain output: `trainer <event> key=value ...`."""
    parts = [f"{k}={_fmt(v)}" for k, v in fields.items()]
    return " ".join([time.strftime("%Y-%m-%dT%H:%M:%S"), "trainer", event, *parts])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


STDOUT_CLOSED = "stdout was closed (a pipe reader such as `head` exited); training goes on, output goes to stderr"


def stream_closed(stream: Any) -> Any:
    """After EPIPE on `stream`, the stream to write to instead: stderr, said once on stderr.

    A closed stdout or stderr is pointed at /dev/null: Python flushes them again at exit, and
    that flush failing too would end a run that went well with status 120. When stderr is the
    closed one (`2>&1 | head`), output goes on into /dev/null.
    """
    std = any(stream is s for s in (sys.stdout, sys.__stdout__, sys.stderr, sys.__stderr__))
    if std:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
    if stream is sys.stderr or stream is sys.__stderr__:
        return stream
    with contextlib.suppress(OSError):
        print(log_line("warning", message=repr(STDOUT_CLOSED)), file=sys.stderr, flush=True)
    return sys.stderr


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

    def _print(self, text: str) -> None:
        """Print a line; when the reader of a pipe has gone, say so once and go on on stderr."""
        try:
            print(text, file=self.stream, flush=True)
        except BrokenPipeError:
            self.stream = stream_closed(self.stream)
            with contextlib.suppress(BrokenPipeError):
                print(text, file=self.stream, flush=True)

    def start(self, *, first_step: int, total_steps: int) -> None:
        self._next = (first_step // self.every + 1) * self.every
        self._total = total_steps

    def update(self, metrics: dict[str, float]) -> None:
        step = int(metrics["step"])
        if step < self._next and step < self._total:
            return
        self._next = (step // self.every + 1) * self.every
        self._print(log_line("progress", **metrics))

    def message(self, text: str) -> None:
        self._print(text)

    def close(self) -> None:
        pass


class RichBar:
    """A live bar with step, steps/s, loss and ETA, for a terminal."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or _PipeSafeConsole()
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


class _PipeSafeConsole(Console):
    """A console that, when its pipe's reader has gone, goes on on stderr instead of exiting (Rich's default)."""

    def on_broken_pipe(self) -> None:
        self.file = stream_closed(self.file)


def make_reporter(kind: str, log_every: int) -> Reporter:
    """`rich` on a terminal (or when asked), else plain lines."""
    if kind == "rich" or (kind == "auto" and sys.stdout.isatty()):
        return RichBar()
    return PlainLog(log_every)


class Heartbeat:
    """Rewrites `heartbeat.json` (common.run.protocol.TrainerHeartbeat) at most once per `every_secs`.

    The evaluator reads it to show the trainer's status; it is a consumer like any display.
    `spent` (the stop request already honoured) goes into every write, so that it stays on
    record while done.json is gone. `extra` fields go into every write too.
    """

    def __init__(self, storage: Storage, every_secs: float = 1.0, extra: dict[str, Any] | None = None, *,
                 spent: StopRequestId | None = None) -> None:
        self.storage = storage
        self.every_secs = every_secs
        self.extra = dict(extra or {})
        self.spent = spent
        self._last = 0.0
        self._total = 0

    def start(self, *, first_step: int, total_steps: int) -> None:
        self._total = total_steps
        self._write(TrainerHeartbeat(step=first_step, steps_per_sec=0.0, state="running"))

    def update(self, metrics: dict[str, float]) -> None:
        if time.monotonic() - self._last >= self.every_secs:
            self._write(TrainerHeartbeat.from_metrics({**metrics, "step": int(metrics["step"])}, state="running"))

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        self._write(TrainerHeartbeat(state="stopped"))

    def _write(self, beat: TrainerHeartbeat) -> None:
        self._last = time.monotonic()
        # A spent request passed as a plain field (older callers) is still written as one.
        extra = {k: v for k, v in self.extra.items() if k != SPENT_KEY}
        spent = self.spent or StopRequestId.from_json(self.extra.get(SPENT_KEY))
        beat = dataclasses.replace(beat, pid=os.getpid(), time=time.time(), total_steps=self._total,
                                   spent_stop_request=spent, extra=extra | beat.extra)
        with contextlib.suppress(OSError):  # a missed heartbeat must never stop training
            beat.write(self.storage)


class Tee:
    """Send every call to several reporters."""

    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters

    def start(self, *, first_step: int, total_steps: int) -> None:
        for r in self.reporters:
            r.start(first_step=first_step, total_steps=total_steps)

    def update(self, metrics: dict[str, float]) -> None:
        for r in self.reporters:
            r.update(metrics)

    def message(self, text: str) -> None:
        for r in self.reporters:
            r.message(text)

    def close(self) -> None:
        for r in self.reporters:
            r.close()


class TensorBoardLog:
    """Scalars for TensorBoard under `tb/train`: loss, learning rate and steps/s by step.

    `mirror`: for a bucket workdir, the local folder TF writes into (`logdir` is inside it), copied
    into the bucket every `mirror.every_secs` and at `close`.
    """

    def __init__(self, logdir: Path, mirror: MirroredFolder | None = None) -> None:
        import tensorflow as tf

        self._tf = tf
        self.writer = tf.summary.create_file_writer(str(logdir))
        self.mirror = mirror

    def start(self, *, first_step: int, total_steps: int) -> None:
        pass

    def update(self, metrics: dict[str, float]) -> None:
        with self.writer.as_default(step=int(metrics["step"])):
            for name in ("loss", "lr", "steps_per_sec"):
                self._tf.summary.scalar(name, metrics[name])
        if self.mirror is not None and self.mirror.due():
            self.writer.flush()
            self.mirror.sync()

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
        if self.mirror is not None:
            self.mirror.close()
