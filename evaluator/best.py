"""`eval/best/`: the files of the best checkpoint so far, and `eval/best.json` describing it.

`eval/best` is a symlink to a complete folder `eval/best-<step>-<id>/` that holds the checkpoint's
hard-linked files, a `checkpoint` state file (so `tf.train.latest_checkpoint("eval/best")` works)
and `best.json`; `eval/best.json` is a symlink to `best/best.json`. Replacing the one `best`
symlink by a rename switches files and description together, so a crash can never leave them
disagreeing. Ties keep the earlier checkpoint.

Every delete goes through `common.paths.remove`, and only folders named `best-*` directly in
`eval/` are ever removed as old bests: a `best` link edited to point elsewhere makes nothing
outside the workdir disappear. What is refused is passed to `warn`, never dropped.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from common import checkpoints, locate
from common.checkpoints import State
from common.fileio import atomic_write_bytes, fsync_path
from common.paths import OutsideError, remove
from common.protocol import BestEntry, LedgerRow
from common.workdir import BEST_JSON, BEST_LINK, EVAL_DIR, pid_alive, remove_dead_leases
from evaluator.ledger import Record
from evaluator.snapshot import Gone, snapshot

Warn = Callable[[str], None]
_FOLDER_PREFIX = f"{BEST_LINK}-"


def _to_stderr(message: str) -> None:
    print(f"evaluator: warning: {message}", file=sys.stderr)


def improves(record: Record, best: BestEntry | Mapping[str, Any] | None) -> bool:
    """Whether an ok record beats the current best (strictly: ties keep the earlier step).

    `best` is the typed entry, or best.json's object as `common.workdir.read_best` returns it.
    """
    row = LedgerRow(record)
    if row.status != "ok" or row.accuracy is None:
        return False
    if best is None:
        return True
    accuracy = best.accuracy if isinstance(best, BestEntry) else best.get("accuracy")
    return float(row.accuracy) > float(-1.0 if accuracy is None else accuracy)


def promote(workdir: Path, private_prefix: Path, record: Record, *, warn: Warn = _to_stderr) -> BestEntry:
    """Make the snapshot folder holding `private_prefix` the new best; return its best.json entry.

    Raises:
      OSError: the switch could not be made (full disk, read-only); the old best is left as it was.
    """
    eval_dir = workdir / EVAL_DIR
    folder = private_prefix.parent
    name = private_prefix.name
    row = LedgerRow(record)
    entry = BestEntry(checkpoint=name, step=row.step, accuracy=row.accuracy, loss=row.loss, split=row.split,
                      weights=row.weights, committed=row.committed,
                      source=str(checkpoints.resolve(workdir, name)), time=time.time())
    adopt_copied_best(workdir, warn=warn)
    checkpoints.write_state(folder, State(latest=name, paths=[name], timestamps=[row.committed or 0.0]))
    entry.write_into(folder)
    target = eval_dir / f"{_FOLDER_PREFIX}{row.step}-{secrets.token_hex(3)}"
    os.rename(folder, target)
    link = eval_dir / BEST_LINK
    previous = os.readlink(link) if link.is_symlink() else None
    _replace_symlink(link, target.name)
    if not (eval_dir / BEST_JSON).is_symlink():
        _replace_symlink(eval_dir / BEST_JSON, f"{BEST_LINK}/{BEST_JSON}")
    fsync_path(eval_dir)
    if previous is not None:
        _remove_previous(workdir, previous, warn)
    return entry


def catch_up(workdir: Path, records: list[Record], *, weights: str, warn: Warn = _to_stderr) -> BestEntry | None:
    """Promote the ledger's best validation result if eval/best lags behind it; return the new entry or None.

    The ledger is written before a promotion, so a promotion that failed (full disk) or was cut
    short (a crash) leaves the ledger ahead. Only a checkpoint still in the workdir with the
    `.index` fingerprint the ledger recorded is used: the files must be those that were evaluated.

    Raises:
      OSError: the promotion failed again; the old best is left as it was.
    """
    best = BestEntry.read(workdir)
    ranked = [row for row in map(LedgerRow, records) if row.split == "validation" and row.weights == weights
              and row.index_fingerprint and improves(row.to_json(), best)]
    ranked.sort(key=lambda row: -float(row.accuracy or 0.0))  # stable: ties keep the earlier evaluation
    for row in ranked:
        prefix = checkpoints.resolve(workdir, row.checkpoint)
        if (not checkpoints.inside(workdir, row.checkpoint)
                or checkpoints.index_fingerprint(prefix) != row.index_fingerprint):
            continue
        try:
            with snapshot(prefix, workdir / EVAL_DIR) as private:
                if checkpoints.index_fingerprint(private) == row.index_fingerprint:
                    return promote(workdir, private, row.to_json(), warn=warn)
        except Gone:
            continue
    return None


class BestKeeper:
    """Keeps eval/best up to date through one evaluator run, and says why when it lags behind."""

    def __init__(self, workdir: Path, *, weights: str, warn: Warn = _to_stderr) -> None:
        self.workdir = workdir
        self.weights = weights  # whose results rank checkpoints (the primary weights)
        self.warn = warn
        self.problem = ""  # why the newest improvement is not eval/best yet

    def offer(self, private: Path, main: Record) -> None:
        """Promote the evaluated files to eval/best when they beat the best validation accuracy."""
        if LedgerRow(main).split != "validation" or not improves(main, BestEntry.read(self.workdir)):
            return
        try:
            promote(self.workdir, private, main, warn=self.warn)
        except OSError as e:
            self.problem = (f"could not make {LedgerRow(main).checkpoint} the best checkpoint "
                            f"({e.strerror or e}); retried at the next scan")
        else:
            self.problem = ""

    def sync(self, records: list[Record]) -> None:
        """Retry a promotion that failed or was cut short: make the ledger's best result eval/best."""
        try:
            catch_up(self.workdir, records, weights=self.weights, warn=self.warn)
        except OSError as e:
            self.problem = f"could not update eval/best ({e.strerror or e}); retried at the next scan"
        else:
            self.problem = ""

def _remove_previous(workdir: Path, previous: str, warn: Warn) -> None:
    """Delete the folder the `best` link named before, if it is one of ours."""
    eval_dir = workdir / EVAL_DIR
    if _own_folder(previous) is None:
        warn(f"{eval_dir / BEST_LINK} pointed to {previous}, which is not a best folder of this workdir: "
             "left it in place")
        return
    _remove(eval_dir / previous, workdir, warn)


def _own_folder(target: str) -> str | None:
    """The folder name if link target `target` is a `best-*` folder directly in eval/, else None."""
    return target if target.startswith(_FOLDER_PREFIX) and os.path.basename(target) == target else None


def _remove(path: Path, workdir: Path, warn: Warn) -> None:
    try:
        remove(path, workdir)
    except OutsideError as e:
        warn(str(e))
    except OSError as e:
        warn(f"cannot delete {path}: {e.strerror or e}")


def _replace_symlink(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.link-{secrets.token_hex(3)}")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def adopt_copied_best(workdir: Path, *, warn: Warn = _to_stderr) -> None:
    """Turn an `eval/best` that is a real folder (a workdir copied with `cp -rL` or `scp -r`) into a link.

    The folder keeps its files and stays the best: it is renamed to `eval/best-<step>-<id>/` and
    linked, as if this evaluator had made it. Anything else at `eval/best` is moved aside to
    `eval/best.moved-<id>`, never deleted. Raises OSError when the workdir cannot be changed.
    """
    eval_dir = workdir / EVAL_DIR
    link, described = eval_dir / BEST_LINK, eval_dir / BEST_JSON
    if link.is_symlink() or not link.exists():
        return
    if link.is_dir() and not (link / BEST_JSON).exists() and described.is_file() and not described.is_symlink():
        atomic_write_bytes(link / BEST_JSON, described.read_bytes())
    entry = BestEntry.read_from(link) if link.is_dir() else None
    if entry is None:
        aside = eval_dir / f"{BEST_LINK}.moved-{secrets.token_hex(3)}"
        os.rename(link, aside)
        warn(f"{link} was not a best folder this program can use: moved it to {aside}")
        return
    target = eval_dir / f"{_FOLDER_PREFIX}{'copied' if entry.step is None else entry.step}-{secrets.token_hex(3)}"
    os.rename(link, target)
    _replace_symlink(link, target.name)
    if not described.is_symlink():
        _replace_symlink(described, f"{BEST_LINK}/{BEST_JSON}")
    fsync_path(eval_dir)
    warn(f"{link} was a folder, not a link (a copied workdir?): kept it as {target.name}, linked from {link}")


def clean_stale(workdir: Path, *, warn: Warn = _to_stderr) -> None:
    """Remove best folders the `best` link no longer points to, leftovers of interrupted switches and dead leases."""
    eval_dir = workdir / EVAL_DIR
    if not eval_dir.is_dir():
        return
    try:
        adopt_copied_best(workdir, warn=warn)
    except OSError as e:
        warn(f"cannot turn the folder {eval_dir / BEST_LINK} into a link: {e.strerror or e}")
    link = eval_dir / BEST_LINK
    current = _own_folder(os.readlink(link)) if link.is_symlink() else None
    if link.is_symlink() and current is None:
        # Not knowing which folder is the best, keep them all rather than delete the wrong one.
        warn(f"{link} points to {os.readlink(link)}, not to a best folder of this workdir: "
             "kept every best folder; the next improvement replaces the link")
    else:
        for path in eval_dir.glob(f"{_FOLDER_PREFIX}*"):
            if path.name != current and (path.is_dir() or path.is_symlink()):
                _remove(path, workdir, warn)
    for path in eval_dir.glob(".*.link-*"):
        _remove(path, workdir, warn)
    for path in eval_dir.glob(".snapshot-*"):
        pid = path.name.split("-")[1]
        if not (pid.isdigit() and pid_alive(int(pid))):
            _remove(path, workdir, warn)
    for problem in remove_dead_leases(workdir):
        warn(problem)


def best_prefix(workdir: Path) -> Path | None:
    """The prefix of the best checkpoint's files under eval/best, or None (see `common.locate`)."""
    return locate.best_prefix(workdir)
