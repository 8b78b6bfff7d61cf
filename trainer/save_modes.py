"""The two ways a save runs: `sync` (the training thread writes and commits) and `async` (a writer does).

In `async` mode the training thread takes a snapshot of the variables (trainer.snapshot) and goes
on; one writer thread writes it and commits it through the same `CheckpointSaver.save` as a sync
save, so the commit protocol is unchanged: the state file names a checkpoint only once its files
are durable, and retention deletes only after that commit. At most one save is in flight: the
next save first waits for the previous one, so commits happen in step order, and a failure of
the previous one is raised there (exit code 5) instead of starting another. The end of training,
a signal and an error all wait for the pending save (`close`).

Each save is reported by one log line once its commit is known: the training thread's blocking
time (`blocked_s`, which includes `waited_s`, the wait for the previous save) and the writer's
time (`write_s`).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

import tensorflow as tf

from common.checkpoint import checkpoints
from common.distribute import Topology
from common.errors import UsageError, WorkdirIOError
from common.storage.paths import Location
from trainer import snapshot
from trainer.progress import log_line
from trainer.saver import CheckpointSaver

SYNC, ASYNC = "sync", "async"
SAVE_MODES = (SYNC, ASYNC)


@dataclasses.dataclass(frozen=True)
class SaveTimes:
    """How long one save took, for its log line."""

    step: int  # the step saved
    mode: str  # "sync" or "async"
    blocked_s: float  # time the training thread spent in the save, `waited_s` included
    waited_s: float  # of that, the wait for the previous save to commit (async only)
    write_s: float  # time the writer spent writing and committing

    def line(self) -> str:
        """The save's log line."""
        return log_line("saved", step=self.step, mode=self.mode, blocked_s=round(self.blocked_s, 4),
                        waited_s=round(self.waited_s, 4), write_s=round(self.write_s, 4))


def choose(requested: str | None, topo: Topology) -> tuple[str, str | None]:
    """The save mode for this run, and the sentence to log when the default could not be honoured.

    `requested` is --save-mode (checked by TrainConfig), or None for the default (async where a
    save can run in the background). A multi-worker save is collective: every worker must take part in it on its
    training thread, so it is sync; asking for async there is an error.

    Raises:
      UsageError: async asked for where it cannot run.
    """
    if topo.strategy == "multi-worker":
        if requested == ASYNC:
            raise UsageError("--save-mode async: a multi-worker save is collective (every worker writes its part "
                             "on its training thread); use --save-mode sync, the default there")
        why = None if requested == SYNC else ("saves are sync: a multi-worker save is collective (every worker "
                                              "writes its part), so it cannot run in the background")
        return SYNC, why
    return requested or ASYNC, None


class SyncSaves:
    """Saves written and committed on the training thread."""

    def __init__(self, saver: CheckpointSaver, *, report: Callable[[str], None]) -> None:
        self.saver = saver
        self.report = report  # takes one log line; called on the training thread only

    def save(self, step: int) -> Location:
        """Commit a checkpoint for `step`; return its prefix."""
        began = time.perf_counter()
        prefix = self.saver.save(step)
        spent = time.perf_counter() - began
        self.report(SaveTimes(step, SYNC, spent, 0.0, spent).line())
        return prefix

    def poll(self) -> None:
        """Nothing is ever pending."""

    def close(self) -> None:
        """Nothing is ever pending."""


class AsyncSaves:
    """Saves snapshotted on the training thread, written and committed by one writer thread at a time."""

    def __init__(self, saver: CheckpointSaver, *, report: Callable[[str], None]) -> None:
        self.saver = saver  # used by the writer thread only while a save is in flight
        self.report = report  # takes one log line; called on the training thread only
        self._writer: threading.Thread | None = None
        self._pending: tuple[int, float, float] | None = None  # step, blocked_s, waited_s of the save in flight
        self._write_s = 0.0
        self._error: BaseException | None = None

    def save(self, step: int) -> Location:
        """Wait for the previous save (raising its failure), snapshot the variables, start the write; return the prefix.

        Raises:
          WorkdirIOError: the previous save failed; or the snapshot could not be taken.
        """
        began = time.perf_counter()
        self._finish()
        waited = time.perf_counter() - began
        try:
            taken = snapshot.take(self.saver.checkpoint)
        except snapshot.SnapshotError as e:
            raise WorkdirIOError(f"saving step {step}: {e}") from e
        except tf.errors.OpError as e:  # e.g. no host memory left for the copy
            raise WorkdirIOError(f"saving step {step}: the variables could not be copied for a background save "
                                 f"({str(e).splitlines()[0]}); the previous checkpoints are intact") from e
        self._pending = (step, time.perf_counter() - began, waited)
        self._writer = threading.Thread(target=self._write, args=(step, taken), name=f"checkpoint-writer-{step}")
        self._writer.start()
        return self.saver.workdir / checkpoints.name_for(step)

    def poll(self) -> None:
        """Report the pending save if its writer has finished; raise its failure (exit code 5)."""
        if self._writer is not None and not self._writer.is_alive():
            self._finish()

    def close(self) -> None:
        """Wait for the pending save and report it; raise its failure (the end of training, a signal, an error)."""
        self._finish()

    def _finish(self) -> None:
        """Join the writer in flight, if any; log its save or raise its failure."""
        if self._writer is None or self._pending is None:
            return
        self._writer.join()
        step, blocked, waited = self._pending
        self._writer, self._pending = None, None
        error, self._error = self._error, None
        if isinstance(error, WorkdirIOError):
            raise WorkdirIOError(f"background save of step {step} failed: {error}") from error
        if error is not None:
            raise WorkdirIOError(f"background save of step {step} failed: {type(error).__name__}: {error}; "
                                 "the previous checkpoints are intact") from error
        self.report(SaveTimes(step, ASYNC, blocked, waited, self._write_s).line())

    def _write(self, step: int, taken: snapshot.Snapshot) -> None:
        """The writer thread: write the snapshot and commit it; keep a failure for the training thread."""
        began = time.perf_counter()
        try:
            self.saver.save(step, write=taken.write)
        except BaseException as e:  # every failure goes to the training thread; none may end only this thread
            self._error = e
        self._write_s = time.perf_counter() - began
