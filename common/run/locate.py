"""One way to name a checkpoint: a workdir's best, its latest or step N, or a prefix given as it is.

Both programs use it: the trainer for `--init-from`, the evaluator for `export` and `report`, and
`predict` for `--model`. The errors say what is missing without naming a flag, so that each
command can put its own flag and advice in front.
"""

from __future__ import annotations

from pathlib import Path

from common.checkpoint import checkpoints
from common.errors import UsageError
from common.layout import BEST_LINK, EVAL_DIR
from common.run.protocol import BestEntry
from common.storage import open_storage
from common.storage.paths import BucketPath, Workdir

BEST = "best"  # the evaluator's best checkpoint, kept under eval/best
LATEST = "latest"  # the one the state file names
BEST_ELSE_LATEST = "best-else-latest"  # what a workdir given without a step means
Which = str | int  # one of the three names above, or a step number


class LocateError(UsageError):
    """No usable checkpoint is there; `why` says what is missing, and `source` where."""

    def __init__(self, source: Workdir, why: str) -> None:
        super().__init__(f"{source}: {why}")
        self.source = source
        self.why = why


class NoBest(LocateError):
    """The workdir has no best checkpoint yet (the evaluator keeps one from validation results)."""


class NoCheckpoint(LocateError):
    """The workdir has no checkpoint at all (no state file)."""


class Unreadable(LocateError):
    """The checkpoint named is missing, truncated or corrupt; `source` is its prefix."""


def best_prefix(workdir: Workdir) -> Workdir | None:
    """The prefix of the best checkpoint's files under eval/best (a bucket's: the folder it points to), or None."""
    entry = BestEntry.read(workdir)  # a best.json without a checkpoint name reads as none
    if entry is None:
        return None
    if isinstance(workdir, BucketPath):
        folder = open_storage(workdir).pointer(f"{EVAL_DIR}/{BEST_LINK}")
        return None if folder is None else workdir / EVAL_DIR / folder / entry.checkpoint
    return workdir / EVAL_DIR / BEST_LINK / entry.checkpoint


def latest_prefix(workdir: Workdir) -> Workdir | None:
    """The prefix of the checkpoint the state file names, or None when there is no state file."""
    state = checkpoints.read_state(workdir)
    if state is None or state.latest is None:
        return None
    return checkpoints.resolve(workdir, state.latest)


def locate(source: Workdir, which: Which = BEST_ELSE_LATEST, *, check: bool = True) -> Workdir:
    """The checkpoint prefix that `which` names in workdir `source`, or `source` itself if it is not a folder.

    Args:
      source: a workdir, or a checkpoint prefix (`runs/x/model-1000`), which is used as it is; either
        may be in a bucket (`s3://b/x`), whose checkpoints callers read through `checkpoints.local_copy`.
      which: for a workdir, `BEST`, `LATEST`, `BEST_ELSE_LATEST` or a step number.
      check: read the whole checkpoint to make sure it is usable. Callers that restore it at once
        may skip this: the restore reads it anyway and raises `CheckpointError`.

    Returns:
      The prefix, e.g. `runs/x/eval/best/model-9000` or `runs/x/model-1000`.

    Raises:
      NoBest: `which` is `BEST` and the evaluator has kept no best checkpoint yet.
      NoCheckpoint: `which` is `LATEST` or `BEST_ELSE_LATEST` and the workdir has no checkpoint.
      Unreadable: `check` is set and the checkpoint is missing, truncated or corrupt.
      CheckpointError: the workdir's state file is broken.
      ValueError: `which` is none of the above.
    """
    prefix = _in_workdir(source, which) if is_workdir(source) else source
    if check:
        why = checkpoints.check_readable(prefix)
        if why:
            raise Unreadable(prefix, why)
    return prefix


def is_workdir(source: Workdir) -> bool:
    """Whether `source` is a workdir rather than a checkpoint prefix (in a bucket: has no `.index` object)."""
    return not _has_index(source) if isinstance(source, BucketPath) else source.is_dir()


def _has_index(prefix: Workdir) -> bool:
    """Whether checkpoint `prefix`'s `.index` file (or object) exists."""
    if isinstance(prefix, BucketPath):
        return open_storage(prefix.parent).stat(f"{prefix.name}.index") is not None
    return Path(f"{prefix}.index").exists()


def _by_step(workdir: Workdir, step: int) -> Workdir:
    """`model-<step>`, else the listed checkpoint of that step (a TF1 Saver's `<name>-<step>`)."""
    own = workdir / checkpoints.name_for(step)
    if _has_index(own):
        return own
    state = checkpoints.read_state(workdir)
    for name in state.paths if state is not None else []:
        if checkpoints.saver_step(name) == step and checkpoints.inside(workdir, name):
            return checkpoints.resolve(workdir, name)
    return own


def _in_workdir(workdir: Workdir, which: Which) -> Workdir:
    """The prefix `which` names in `workdir`, before any check that it can be read."""
    if isinstance(which, int):
        return _by_step(workdir, which)
    if which not in (BEST, LATEST, BEST_ELSE_LATEST):
        raise ValueError(f"`which` ({which!r}) must be {BEST!r}, {LATEST!r}, {BEST_ELSE_LATEST!r} or a step number")
    best = best_prefix(workdir) if which != LATEST else None
    if best is not None:
        return best
    if which == BEST:
        raise NoBest(workdir, "no best checkpoint yet")
    latest = latest_prefix(workdir)
    if latest is None:
        raise NoCheckpoint(workdir, "no checkpoint (no state file)")
    return latest
