"""`eval/best/`: the files of the best checkpoint so far, and `eval/best.json` describing it.

`eval/best` is a symlink to a complete folder `eval/best-<step>-<id>/` that holds the checkpoint's
hard-linked files, a `checkpoint` state file (so `tf.train.latest_checkpoint("eval/best")` works)
and `best.json`; `eval/best.json` is a symlink to `best/best.json`. Replacing the one `best`
symlink by a rename switches files and description together, so a crash can never leave them
disagreeing. Ties go to the earlier step.

The switch is made through the storage seam (`Storage.adopt`, `point`, `pointer`): a symlink swap
on a local disk. Every delete goes through `Storage.delete` (refused outside the workdir), and
only folders named `best-*` directly in `eval/` are ever removed as old bests: a `best` link
edited to point elsewhere makes nothing outside the workdir disappear. What is refused is passed
to `warn`, never dropped.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from common.checkpoint import checkpoints
from common.checkpoint.checkpoints import STATE_FILE, State
from common.layout import BEST_JSON, BEST_LINK, BEST_LOCK, EVAL_DIR
from common.run.ledger import Record
from common.run.protocol import BestEntry, LedgerRow
from common.run.workdir import Workdir
from common.storage import Gone, Storage
from common.storage.fileio import atomic_write_bytes
from common.storage.paths import OutsideError, absolute
from evaluator.sets import DEFAULT_SELECTION, Selection

Warn = Callable[[str], None]
_FOLDER_PREFIX = f"{BEST_LINK}-"
_BEST = f"{EVAL_DIR}/{BEST_LINK}"  # the pointer to the best folder
_BEST_JSON = f"{EVAL_DIR}/{BEST_JSON}"  # the pointer to its best.json


def _to_stderr(message: str) -> None:
    print(f"evaluator: warning: {message}", file=sys.stderr)


def improves(row: LedgerRow, best: BestEntry | Mapping[str, Any] | None,
             selection: Selection = DEFAULT_SELECTION) -> bool:
    """Whether an ok row beats the current best on `selection`'s metric, or equals it at an earlier step.

    Ties go to the earlier step whatever the order of evaluation, which several evaluators do not
    keep. `best` is the typed entry, or best.json's object as `common.storage.read_best` returns it.
    Only like results compare (`comparable`): a raw result never replaces an EMA best, nor a test
    result a validation best.
    """
    score = selection.score(row.fields) if row.status == "ok" else None
    if score is None:
        return False
    if best is None:
        return True
    entry = best if isinstance(best, BestEntry) else BestEntry.from_json({"checkpoint": "", **best})
    if entry is None or why_incomparable(row.weights, entry, selection):
        return False
    held = best_score(entry)
    if held is None:
        return True
    earlier = row.step is not None and entry.step is not None and row.step < entry.step
    return score > held or (score == held and earlier)


def why_incomparable(weights: str | None, best: BestEntry, selection: Selection) -> str:
    """Why a result of `weights`, ranked by `selection`, may not be ranked against `best`; "" when it may.

    Entries written before a field was recorded hold any weights, and validation accuracy.
    """
    held = Selection(best.split or "validation", best.metric or "accuracy", best.mode or "max")
    if best.weights is not None and best.weights != weights:
        return f"eval/best ranks {best.weights} weights and this evaluator {weights}"
    if held != selection:
        return f"eval/best ranks {held.describe()} and this evaluator {selection.describe()}"
    return ""


def best_score(best: BestEntry) -> float | None:
    """The best's value of its metric, turned so that higher is better (old entries: their accuracy)."""
    value = best.value if best.value is not None else best.accuracy
    if value is None:
        return None
    return float(value) if (best.mode or "max") == "max" else -float(value)


@contextlib.contextmanager
def best_lock(storage: Storage) -> Iterator[None]:
    """Held around compare-and-promote and the start-up clean, so that evaluators sharing a workdir take turns.

    Without it, two evaluators could both read the same best, both find theirs better and let the
    lower one win, or one could delete, as stale, the folder the other has just made the best.
    """
    with storage.lock(f"{EVAL_DIR}/{BEST_LOCK}", wait=True):  # no note: nothing to write while the disk is full
        yield


def promote(workdir: Workdir, private_prefix: Path, row: LedgerRow, *, selection: Selection = DEFAULT_SELECTION,
            warn: Warn = _to_stderr) -> BestEntry:
    """Make the pinned folder holding `private_prefix` the new best; return its best.json entry.

    The folder becomes `eval/best-<step>-<id>/` (`Storage.adopt`), then the `best` pointer is
    switched to it (`Storage.point`: a symlink swap locally). On an object store the same two
    steps are copies into `eval/best-<step>-<id>/`, then `eval/best.json` written last as the pointer.

    Raises:
      OSError: the switch could not be made (full disk, read-only); the old best is left as it was.
    """
    storage = workdir.storage
    folder = private_prefix.parent
    name = private_prefix.name
    entry = BestEntry(checkpoint=name, step=row.step, accuracy=row.accuracy, loss=row.loss, split=row.split,
                      weights=row.weights, committed=row.committed,
                      source=absolute(workdir.resolve(name)), time=time.time(), metric=selection.metric,
                      mode=selection.mode, value=selection.value(row.fields))
    adopt_copied_best(workdir, warn=warn)
    state = State(latest=name, paths=[name], timestamps=[row.committed or 0.0])
    atomic_write_bytes(folder / STATE_FILE, checkpoints.state_bytes(state))
    entry.write_into(folder)
    target = f"{_FOLDER_PREFIX}{row.step}-{secrets.token_hex(3)}"
    storage.adopt(folder, f"{EVAL_DIR}/{target}")
    previous = storage.pointer(_BEST)
    storage.point(_BEST, target)
    if storage.pointer(_BEST_JSON) is None:
        storage.point(_BEST_JSON, f"{BEST_LINK}/{BEST_JSON}")
    if previous is not None:
        _remove_previous(storage, previous, warn)
    return entry


def ranked(records: list[Record], selection: Selection, *, weights: str) -> list[LedgerRow]:
    """The ok results of `selection`'s set and `weights`, best first (ties: the earlier step)."""
    scored = [(score, row) for row in map(LedgerRow, records)
              if row.split == selection.set and row.weights == weights and row.status == "ok"
              and (score := selection.score(row.fields)) is not None]
    scored.sort(key=lambda pair: (-pair[0], pair[1].step if pair[1].step is not None else 0))
    return [row for _, row in scored]


def better_than_best(workdir: Workdir, records: list[Record], *, weights: str,
                     selection: Selection = DEFAULT_SELECTION) -> list[LedgerRow]:
    """The ledger's results that beat eval/best on `selection`, best first (ties: the earlier step)."""
    best = workdir.best()
    return [row for row in ranked(records, selection, weights=weights)
            if row.index_fingerprint and improves(row, best, selection)]


def catch_up(workdir: Workdir, records: list[Record], *, weights: str, selection: Selection = DEFAULT_SELECTION,
             warn: Warn = _to_stderr) -> BestEntry | None:
    """Promote the ledger's best result if eval/best lags behind it; return the new entry or None.

    The ledger is written before a promotion, so a promotion that failed (full disk) or was cut
    short (a crash) leaves the ledger ahead. Only a checkpoint still in the workdir with the
    `.index` fingerprint the ledger recorded is used: the files must be those that were evaluated.

    Raises:
      OSError: the promotion failed again; the old best is left as it was.
    """
    for row in better_than_best(workdir, records, weights=weights, selection=selection):
        name = Path(row.checkpoint).name
        if not workdir.inside(row.checkpoint) or workdir.fingerprint(name) != row.index_fingerprint:
            continue
        try:
            with workdir.pin(name) as private:
                if checkpoints.file_fingerprint(private) == row.index_fingerprint:
                    return promote(workdir, private, row, selection=selection, warn=warn)
        except Gone:
            continue
    return None


class BestKeeper:
    """Keeps eval/best up to date through one evaluator run, and says why when it lags behind."""

    def __init__(self, workdir: Workdir, *, weights: str, selection: Selection = DEFAULT_SELECTION,
                 warn: Warn = _to_stderr) -> None:
        self.workdir = workdir
        self.weights = weights  # whose results rank checkpoints (the primary weights)
        self.selection = selection  # the set and metric that rank them
        self.warn = warn
        self.problem = ""  # why the newest improvement is not eval/best yet
        self.mismatch = ""  # eval/best ranks other results than this evaluator (found by `offer` or `sync`)
        self._checked = False  # whether `sync` has compared eval/best's ranking with this evaluator's

    def _check_like(self, best: BestEntry | None, weights: str | None = None) -> None:
        """Set `mismatch` to why eval/best's results do not rank against this evaluator's ("" when they do)."""
        why = "" if best is None else why_incomparable(weights or self.weights, best, self.selection)
        mismatch = f"{why}: left it alone (remove {self.workdir.describe(_BEST)} to rank anew)" if why else ""
        if mismatch and mismatch != self.mismatch:
            self.warn(mismatch)  # once: the header keeps showing it as `problem`
        self.mismatch = mismatch
        self.problem = self.mismatch or self.problem

    def offer(self, private: Path, main: LedgerRow) -> None:
        """Promote the evaluated files to eval/best when `main` (the selected set's result) beats the best."""
        if main.split != self.selection.set:
            return
        try:
            with best_lock(self.workdir.storage):
                best = self.workdir.best()
                self._check_like(best, main.weights)
                if self.mismatch:
                    self.problem = self.mismatch
                    return
                if improves(main, best, self.selection):
                    promote(self.workdir, private, main, selection=self.selection, warn=self.warn)
        except OSError as e:
            self.problem = (f"could not make {main.checkpoint} the best checkpoint "
                            f"({e.strerror or e}); retried at the next scan")
        else:
            self.problem = ""

    def sync(self, records: list[Record]) -> None:
        """Retry a promotion that failed or was cut short: make the ledger's best result eval/best.

        The lock is taken only when the ledger holds a better result (read again under it): an idle
        scan costs no lock, which in a bucket is several requests.
        """
        try:
            if not self._checked:  # once per run: an evaluator that ranks other results never touches eval/best
                self._checked = True
                self._check_like(self.workdir.best())
            if better_than_best(self.workdir, records, weights=self.weights, selection=self.selection):
                with best_lock(self.workdir.storage):
                    catch_up(self.workdir, records, weights=self.weights, selection=self.selection, warn=self.warn)
        except OSError as e:
            self.problem = f"could not update eval/best ({e.strerror or e}); retried at the next scan"
        else:
            self.problem = self.mismatch  # kept while eval/best ranks other results, without reading it again


def _remove_previous(storage: Storage, previous: str, warn: Warn) -> None:
    """Delete the folder the `best` pointer named before, if it is one of ours."""
    if _own_folder(previous) is None:
        warn(f"{storage.describe(_BEST)} pointed to {previous}, which is not a best folder of this workdir: "
             "left it in place")
        return
    _remove(storage, f"{EVAL_DIR}/{previous}", warn)


def _own_folder(target: str) -> str | None:
    """The folder name if link target `target` is a `best-*` folder directly in eval/, else None."""
    return target if target.startswith(_FOLDER_PREFIX) and os.path.basename(target) == target else None


def _remove(storage: Storage, key: str, warn: Warn) -> None:
    try:
        storage.delete(key)
    except OutsideError as e:
        warn(str(e))
    except OSError as e:
        warn(f"cannot delete {storage.describe(key)}: {e.strerror or e}")


def adopt_copied_best(workdir: Workdir, *, warn: Warn = _to_stderr) -> None:
    """Turn an `eval/best` that is a real folder (a workdir copied with `cp -rL` or `scp -r`) into a link.

    The folder keeps its files and stays the best: it is renamed to `eval/best-<step>-<id>/` and
    linked, as if this evaluator had made it. Anything else at `eval/best` is moved aside to
    `eval/best.moved-<id>`, never deleted. Raises OSError when the workdir cannot be changed.

    A repair of local copies only, so it looks at the local folder: copying a bucket keeps
    `eval/best.json`, the pointer, as it is.
    """
    root = workdir.local_folder()
    if root is None:
        return
    storage = workdir.storage
    eval_dir = root / EVAL_DIR
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
    target = f"{_FOLDER_PREFIX}{'copied' if entry.step is None else entry.step}-{secrets.token_hex(3)}"
    storage.adopt(link, f"{EVAL_DIR}/{target}")
    storage.point(_BEST, target)
    if storage.pointer(_BEST_JSON) is None:
        storage.point(_BEST_JSON, f"{BEST_LINK}/{BEST_JSON}")
    warn(f"{link} was a folder, not a link (a copied workdir?): kept it as {target}, linked from {link}")


def clean_stale(workdir: Workdir, *, warn: Warn = _to_stderr) -> None:
    """Remove best folders the `best` pointer no longer names, leftovers of interrupted switches and dead readers."""
    storage = workdir.storage
    if not storage.is_folder(EVAL_DIR):
        return
    try:
        with best_lock(storage):
            _clean_best(workdir, warn)
    except OSError as e:
        warn(f"cannot clean {storage.describe(EVAL_DIR)}: {e.strerror or e}")
    for problem in storage.clean_readers():
        warn(problem)


def _clean_best(workdir: Workdir, warn: Warn) -> None:
    """clean_stale's part under the best lock: the best folders and the leftovers of switches."""
    storage = workdir.storage
    try:
        adopt_copied_best(workdir, warn=warn)
    except OSError as e:
        warn(f"cannot turn the folder {storage.describe(_BEST)} into a link: {e.strerror or e}")
    pointer = storage.pointer(_BEST)
    current = _own_folder(pointer) if pointer is not None else None
    if pointer is not None and current is None:
        # Not knowing which folder is the best, keep them all rather than delete the wrong one.
        warn(f"{storage.describe(_BEST)} points to {pointer}, not to a best folder of this workdir: "
             "kept every best folder; the next improvement replaces the link")
    else:
        for name in storage.names(EVAL_DIR, f"{_FOLDER_PREFIX}*"):
            # A file of that name is not ours (locally; a store has no such kinds).
            if name != current and storage.is_folder(f"{EVAL_DIR}/{name}"):
                _remove(storage, f"{EVAL_DIR}/{name}", warn)
    for name in storage.names(EVAL_DIR, ".*.link-*"):
        _remove(storage, f"{EVAL_DIR}/{name}", warn)

