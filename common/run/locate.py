"""One way to name a checkpoint: a workdir's best, its latest or step N, or a prefix given as it is.

Both programs use it: the trainer for `--init-from`, the evaluator for `export` and `report`, and
`predict` for `--model`. The errors say what is missing without naming a flag, so that each
command can put its own flag and advice in front.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

from common.checkpoint import checkpoints
from common.errors import UsageError
from common.run.workdir import Workdir
from common.storage import Storage, open_source
from common.storage.paths import Location

BEST = "best"  # the evaluator's best checkpoint, kept under eval/best
LATEST = "latest"  # the one the state file names
BEST_ELSE_LATEST = "best-else-latest"  # what a workdir given without a step means
Which = str | int  # one of the three names above, or a step number
PREFIX_ONLY = "prefix-only"  # `locate(check=...)`: check a prefix given as it is, not a workdir's checkpoint


class LocateError(UsageError):
    """No usable checkpoint is there; `why` says what is missing, and `source` where."""

    def __init__(self, source: Location | Located | Workdir, why: str) -> None:
        super().__init__(f"{source}: {why}")
        self.source = source
        self.why = why


class NoBest(LocateError):
    """The workdir has no best checkpoint yet (the evaluator keeps one from validation results)."""


class NoCheckpoint(LocateError):
    """The workdir has no checkpoint at all (no state file)."""


class Unreadable(LocateError):
    """The checkpoint named is missing, truncated or corrupt; `source` is its prefix."""


@dataclasses.dataclass(frozen=True)
class Located:
    """A checkpoint `locate` found: the storage that holds it and its key there (`eval/best/model-9000`).

    `str()` and `os.fspath()` give its prefix as a user would name it (a path, or a URL).
    """

    storage: Storage
    key: str

    @property
    def prefix(self) -> Location:
        return self.storage.location(self.key)

    @property
    def name(self) -> str:
        return self.key.rpartition("/")[2]

    def readable(self) -> contextlib.AbstractContextManager[Path]:
        """A local prefix TF reads it from while the block runs (see `Storage.readable`)."""
        return self.storage.readable(self.key)

    def __str__(self) -> str:
        return str(self.prefix)

    def __fspath__(self) -> str:
        return os.fspath(self.prefix)


def locate(source: Location | Workdir, which: Which = BEST_ELSE_LATEST, *, check: bool | str = True) -> Located:
    """The checkpoint that `which` names in workdir `source`, or `source` itself if it is a checkpoint prefix.

    Args:
      source: a workdir, or a checkpoint prefix (`runs/x/model-1000`), which is used as it is; either
        may be in a bucket (`s3://b/x`).
      which: for a workdir, `BEST`, `LATEST`, `BEST_ELSE_LATEST` or a step number.
      check: read the whole checkpoint to make sure it is usable. Callers that restore it at once
        may skip this: the restore reads it anyway and raises `CheckpointError`. `PREFIX_ONLY`
        checks a prefix given as it is, so that a path that is nothing usable says why.

    Returns:
      The checkpoint, e.g. `runs/x/eval/best/model-9000` or `runs/x/model-1000`.

    Raises:
      NoBest: `which` is `BEST` and the evaluator has kept no best checkpoint yet.
      NoCheckpoint: `which` is `LATEST` or `BEST_ELSE_LATEST` and the workdir has no checkpoint.
      Unreadable: `check` is set and the checkpoint is missing, truncated or corrupt.
      CheckpointError: the workdir's state file is broken.
      ValueError: `which` is none of the above.
    """
    name = None
    if isinstance(source, Workdir):
        located = _in_workdir(source, which)
    else:
        storage, name = open_source(source)
        located = Located(storage, name) if name is not None else _in_workdir(Workdir(storage), which)
    if check is True or (check == PREFIX_ONLY and name is not None):
        why = checkpoints.check_readable(located.storage, located.key)
        if why:
            raise Unreadable(located.prefix, why)
    return located


def _by_step(workdir: Workdir, step: int) -> str:
    """The key of `model-<step>`, else of the listed checkpoint of that step (a TF1 Saver's `<name>-<step>`)."""
    own = checkpoints.name_for(step)
    if workdir.has_checkpoint(own):
        return own
    state = workdir.state()
    for path in state.paths if state is not None else []:
        key = workdir.key_of(path)
        if checkpoints.saver_step(path) == step and key is not None and workdir.inside(path):
            return key
    return own


def _in_workdir(workdir: Workdir, which: Which) -> Located:
    """The checkpoint `which` names in `workdir`, before any check that it can be read."""
    if isinstance(which, int):
        return Located(workdir.storage, _by_step(workdir, which))
    if which not in (BEST, LATEST, BEST_ELSE_LATEST):
        raise ValueError(f"`which` ({which!r}) must be {BEST!r}, {LATEST!r}, {BEST_ELSE_LATEST!r} or a step number")
    best = workdir.best_key() if which != LATEST else None
    if best is not None:
        return Located(workdir.storage, best)
    if which == BEST:
        raise NoBest(workdir, "no best checkpoint yet")
    state = workdir.state()
    key = workdir.key_of(state.latest) if state is not None and state.latest else None
    if state is None or not state.latest:
        raise NoCheckpoint(workdir, "no checkpoint (no state file)")
    if key is None:  # an absolute path elsewhere, as a TF1 Saver may write: read where it points
        storage, name = open_source(Path(state.latest))
        return Located(storage, name or Path(state.latest).name)
    return Located(workdir.storage, key)
