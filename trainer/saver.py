"""Committing checkpoints: write, fsync, then list in the state file; retention deletes only after.

The order of a save is what makes a crash at any instant safe:
  1. a checkpoint that is about to be replaced (training passes it again after an older one was
     restored) is first taken out of the state file, then its files are removed;
  2. `tf.train.Checkpoint.write` writes the files (TF stages them in `<name>_temp/`);
  3. the files are fsynced, so the state file never names data that is still in flight;
  4. the state file is replaced atomically, listing the new checkpoint and those retention keeps;
  5. only then are the checkpoints it no longer lists deleted.

While an evaluator watches the workdir (it holds a registration lease), retention also keeps the
newest `keep_pending` checkpoints that no evaluator has recorded yet, and a checkpoint it deletes
unrecorded all the same gets a `skipped` row in the evaluators' ledger, so that every commit the
state file listed is named there.
"""

from __future__ import annotations

import errno
import sys
import time
from collections.abc import Callable
from pathlib import Path

import tensorflow as tf

from common.checkpoint import checkpoints
from common.checkpoint.checkpoints import State
from common.errors import WorkdirIOError
from common.layout import EVALUATOR_LEASE
from common.run.ledger import SKIPPED, Ledger
from common.run.protocol import LedgerRow
from common.run.workdir import Workdir
from common.storage import Storage, read_best
from common.storage.paths import Location, OutsideError
from trainer import orphans


def select_kept(
    entries: list[tuple[str, float]], *, keep: int, keep_every_hours: float, anchor: float,
    protected: frozenset[str] = frozenset(),
) -> tuple[list[tuple[str, float]], float]:
    """Choose which checkpoints stay, oldest first.

    `entries` come in save order: the state file's order, the new checkpoint last. Timestamps do
    not decide the order, since a clock stepped back once made the new checkpoint look oldest, so
    that it was dropped and retention stopped deleting. The newest `keep` stay (all when `keep` is
    0), so the new checkpoint always stays. Of the older ones, one stays every `keep_every_hours`,
    counted from `anchor` (the run's first start), like TF's `keep_checkpoint_every_n_hours`. The
    choice for an old checkpoint never changes later. `protected` ones (the evaluator's best,
    those being read) stay whatever else applies.

    Returns:
      The kept (path, timestamp) pairs in save order, and the last preserved timestamp.
    """
    ordered = list(entries)
    recent = ordered if keep == 0 else ordered[-keep:]
    older = ordered[: len(ordered) - len(recent)]
    last = anchor
    preserved = []
    for path, ts in older:
        if keep_every_hours > 0 and ts - last >= keep_every_hours * 3600:
            preserved.append((path, ts))
            last = ts
        elif path in protected:
            preserved.append((path, ts))
    return preserved + recent, last


def _raise_io(what: str, error: Exception, after: str = "the previous checkpoints are intact") -> None:
    """Raise WorkdirIOError for a failed save: `what` failed, why, and `after` (what the workdir holds now)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left" in str(error):
        raise WorkdirIOError(f"{what}: disk full ({text}); {after}") from error
    raise WorkdirIOError(f"{what}: {text}; {after}") from error


def _after_replacing(name: str, state: State) -> str:
    """What a failed save left when `_make_room` had removed the listed checkpoint of the same name first."""
    if state.paths and state.latest:
        kept = ", ".join(Path(p).name for p in state.paths)
        return (f"the earlier {name} had been removed first, to be replaced by this save; the state file lists "
                f"{kept}, and the next start resumes from {Path(state.latest).name} once the cause is mended")
    return (f"the earlier {name} had been removed first, to be replaced by this save, and it was the only "
            "checkpoint kept (--keep 1), so no state file is left; mend the cause and start again: the trainer "
            "resumes from the newest checkpoint left in the workdir, else starts afresh (--keep 2 or more keeps "
            "another checkpoint through such a save)")


class CheckpointSaver:
    """Writes `model-<step>` checkpoints into a workdir and keeps its state file true."""

    def __init__(self, workdir: Workdir, checkpoint: tf.train.Checkpoint, *, state: State, keep: int,
                 keep_every_hours: float, anchor: float, keep_pending: int = 0,
                 warn: Callable[[str], None] | None = None) -> None:
        self.workdir = workdir
        self.storage: Storage = workdir.storage
        self.checkpoint = checkpoint
        self.state = state
        self.keep = keep
        self.keep_every_hours = keep_every_hours
        self.anchor = anchor
        self.keep_pending = keep_pending  # unevaluated checkpoints kept while an evaluator watches
        self.warn = warn or _to_stderr
        self.ledger = Ledger(self.storage)  # read only while an evaluator watches
        # Traced once: an eager `write` re-serializes the object graph in Python at every save;
        # inside a tf.function that happens at tracing only (measured: 24.6 -> 12.6 ms per save).
        self._write = tf.function(lambda prefix: checkpoint.write(prefix))

    def save(self, step: int, write: Callable[[str], None] | None = None) -> Location:
        """Commit a checkpoint for `step`; return its prefix.

        `write` writes the checkpoint's files at a local prefix; by default the live variables are
        written. A background save passes the writer of a snapshot taken earlier (trainer.snapshot).
        """
        name = checkpoints.name_for(step)
        replaced = False
        try:
            replaced = self._make_room(name)
            target = self.storage.checkpoint_target(name)
            if write is None:
                self._write(tf.constant(target))
            else:
                write(target)
            stamps = self.state.timestamps_by_path()
            entries = [(p, stamps.get(p, 0.0)) for p in self.state.paths] + [(name, time.time())]
            leased = self.storage.leased()
            watched = EVALUATOR_LEASE in leased
            protected = self.protected(leased) | (self._pending(entries) if watched else frozenset())
            kept, last = select_kept(entries, keep=self.keep, keep_every_hours=self.keep_every_hours,
                                     anchor=self.anchor, protected=protected)
            new_state = State(latest=name, paths=[p for p, _ in kept], timestamps=[t for _, t in kept],
                              last_preserved_timestamp=last)
            self.storage.commit_checkpoint(name, state_key=checkpoints.STATE_FILE,
                                           state=checkpoints.state_bytes(new_state))
        except (OSError, tf.errors.OpError) as e:
            if replaced:
                _raise_io(f"saving {name}", e, _after_replacing(name, self.state))
            _raise_io(f"saving {name}", e)
        dropped = [p for p in self.state.paths if p not in new_state.paths]
        self.state = new_state
        for old in dropped:
            self._delete(old)
        if watched:
            self._record_skipped([(p, stamps.get(p, 0.0)) for p in dropped])
        return self.workdir / name

    def _pending(self, entries: list[tuple[str, float]]) -> frozenset[str]:
        """The newest `keep_pending` of `entries` older than the newest `keep` that no evaluator has recorded yet."""
        if not self.keep_pending or not self.keep:
            return frozenset()
        try:
            unrecorded = [p for p, ts in entries[:-self.keep] if not self.ledger.has_result(Path(p).name, ts)]
        except OSError as e:  # the evaluators' file: a save never fails for it
            self.warn(f"cannot read the evaluators' ledger ({e.strerror or e}): --keep-pending keeps nothing more "
                      "at this save")
            return frozenset()
        return frozenset(unrecorded[-self.keep_pending:])

    def _record_skipped(self, dropped: list[tuple[str, float]]) -> None:
        """Give each deleted checkpoint that no evaluator recorded a `skipped` row (a failed write is a warning)."""
        why = (f"deleted by the trainer's retention (--keep {self.keep}, --keep-pending {self.keep_pending}) "
               "before an evaluator read it")
        try:
            # Leased now, after the delete: an evaluator leased it before, so it pinned the files in time.
            reading = self.storage.leased()
            rows = [LedgerRow({"checkpoint": Path(p).name, "step": checkpoints.saver_step(p), "status": SKIPPED,
                               "reason": why, "committed": ts, "finished": time.time()})
                    for p, ts in dropped
                    if Path(p).name not in reading and not self.ledger.has_result(Path(p).name, ts)]
            if rows:
                self.ledger.append(rows)
        except (OSError, WorkdirIOError) as e:
            self.warn(f"the skipped checkpoint(s) {', '.join(Path(p).name for p, _ in dropped)} are not recorded in "
                      f"the evaluators' ledger: {e}")

    def protected(self, leased: set[str] | None = None) -> frozenset[str]:
        """Checkpoints retention must not delete: the evaluator's best and those being read (`leased`)."""
        names = set(self.storage.leased() if leased is None else leased)
        best = read_best(self.storage)
        if best and isinstance(best.get("checkpoint"), str):
            names.add(best["checkpoint"])
        return frozenset(names)

    def _make_room(self, name: str) -> bool:
        """Remove an earlier checkpoint of the same name: out of the state file first, then its files.

        Returns whether the state file listed it (a failed save then cannot say the checkpoints are intact).
        """
        listed = name in self.state.paths
        if listed:
            index = self.state.paths.index(name)
            paths = self.state.paths[:index] + self.state.paths[index + 1:]
            by_path = self.state.timestamps_by_path()
            stamps = [by_path.get(p, 0.0) for p in paths]
            latest = self.state.latest if self.state.latest != name else (paths[-1] if paths else None)
            self.state = State(latest=latest, paths=paths, timestamps=stamps,
                               last_preserved_timestamp=self.state.last_preserved_timestamp)
            if latest is None:
                self.storage.delete(checkpoints.STATE_FILE)
            else:
                checkpoints.write_state(self.storage, self.state)
        self._delete(name)
        return listed

    def remove_unlisted(self, keep: frozenset[str] = frozenset()) -> list[str]:
        """Delete checkpoints the state file lost track of (older than its newest); return their names.

        A kill between the state-file rename and the deletes of a save leaves such files behind.
        Protected ones and `keep` (the checkpoint resumed from) stay.
        """
        spared = self.protected() | keep
        gone = [name for name in unlisted(self.workdir, self.state) if name not in spared]
        for name in gone:
            try:
                self._delete(name)
            except OSError as e:
                raise WorkdirIOError(f"removing {name}, which the state file does not list: {e.strerror or e}") from e
        return gone

    def _delete(self, path: str) -> None:
        """Delete a checkpoint's files, only if they lie in this workdir."""
        key = self.workdir.key_of(path)
        try:
            for file in [] if key is None else self.storage.checkpoint_files(key):
                self.storage.delete(file)
        except OutsideError:
            return


def _to_stderr(text: str) -> None:
    print(f"trainer: warning: {text}", file=sys.stderr, flush=True)


def unlisted(workdir: Workdir, state: State) -> list[str]:
    """Checkpoints on disk that `state` does not list: below the newest it lists, or above it and written
    after the last commit (an interrupted save's, see `trainer.orphans`)."""
    named = [state.latest or "", *state.paths]
    listed = {Path(p).name for p in named if p and workdir.inside(p)}
    newest = max((s for s in map(checkpoints.step_of, listed) if s is not None), default=None)
    if newest is None:
        return []
    names = (checkpoints.name_for(s) for s in workdir.steps_on_disk() if s < newest)
    return [n for n in names if n not in listed] + orphans.never_listed(workdir, listed, newest)

