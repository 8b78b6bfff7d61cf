"""`eval/results.jsonl`: every evaluation ever made of a workdir, one JSON object per line.

An append writes whole lines at the end of the file (`Storage.append`: `O_APPEND` and fsync
locally) under the ledger's lock (`Storage.lock`: an flock locally), so it costs the same however
long the ledger is, and two evaluators never lose each other's rows.
A reader keeps what it has parsed and its offset, and later reads only what was appended since.
A line that is not a ledger row (a torn write, a stray byte; see common.run.protocol.LedgerRow) is
skipped and counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from pathlib import Path
from typing import Any

from common.errors import WorkdirIOError
from common.layout import EVAL_DIR, LEDGER_FILE
from common.run.protocol import FINGERPRINT, LedgerRow
from common.storage import Storage

Record = dict[str, Any]  # a ledger row's JSON object (typed access: common.run.protocol.LedgerRow)
# Not a result: an evaluation that a problem of this machine stopped (full disk, no permission).
# Such a row does not count as done, so the checkpoint is evaluated again later.
FAILED = "failed"
# Written by the trainer: a commit its retention deleted before any evaluator read it, while one was
# watching. For every split and weights (it has neither); no `gone` row is added for that commit.
SKIPPED = "skipped"


def version_key(record: Mapping[str, Any]) -> tuple[Any, ...]:
    """Which version of a checkpoint a record is about: its name and the content of its `.index`.

    Rows written before the content fingerprint existed are told apart by the commit time instead.
    """
    if FINGERPRINT not in record:
        return (record.get("checkpoint"), "committed", record.get("committed"))
    return _version(record.get("checkpoint"), record.get(FINGERPRINT), record.get("committed"))


def _version(checkpoint: Any, fingerprint: Any, committed: Any) -> tuple[Any, ...]:
    # Nothing was read of a checkpoint without a fingerprint (gone, refused): its commit time tells them apart.
    return (checkpoint, "index", fingerprint) if fingerprint is not None else (checkpoint, "unread", committed)


def record_key(record: Mapping[str, Any]) -> tuple[Any, ...]:
    """The identity of an evaluation: checkpoint version (see version_key), split and weights."""
    return (*version_key(record), record.get("split"), record.get("weights"))


def commit_key(record: Mapping[str, Any]) -> tuple[Any, ...]:
    """The commit a record is about (name and commit time), whatever was read of it.

    A checkpoint deleted between the listing and the read has no fingerprint: if its commit was
    already evaluated, that result stands, and no `gone` row is added for it.
    """
    return (record.get("checkpoint"), "at", record.get("committed"), record.get("split"), record.get("weights"))


def candidate_keys(checkpoint: str, *, fingerprint: str | None, committed: float, split: str,
                   weights: str) -> tuple[tuple[Any, ...], ...]:
    """The keys under which an evaluation of this checkpoint may already be recorded (new, then old rows)."""
    keys: tuple[tuple[Any, ...], ...] = ((*_version(checkpoint, fingerprint, committed), split, weights),
                                         (checkpoint, "committed", committed, split, weights))
    if fingerprint is None:
        keys += (commit_key({"checkpoint": checkpoint, "committed": committed, "split": split, "weights": weights}),)
    return keys


class Ledger:
    """Reads and appends the evaluation records of one workdir."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.key = f"{EVAL_DIR}/{LEDGER_FILE}"
        self.where = self.storage.describe(self.key)  # for messages: a path, or a bucket's URL
        self.path = Path(self.where)  # a local workdir's ledger file
        self.skipped = 0  # lines that could not be read (not UTF-8, not a JSON object)
        self._records: list[Record] = []
        self._done: set[tuple[Any, ...]] = set()
        self._failed: set[tuple[Any, ...]] = set()
        self._commits: set[tuple[Any, Any]] = set()  # (checkpoint, committed) of every row but failed ones
        self._skipped: set[tuple[Any, Any]] = set()  # the same of skipped rows
        self._offset = 0
        self._identity: str | None = None  # Stat.origin of the file parsed so far
        self._tail: Record | None = None  # a complete JSON object after the last newline (a hand edit)

    def read(self) -> list[Record]:
        """All records, oldest first."""
        self._refresh()
        return self._records + ([self._tail] if self._tail is not None else [])

    def keys(self) -> Set[tuple[Any, ...]]:
        """The identities of every recorded evaluation, except `failed` ones (read-only view)."""
        self._refresh()
        return self._done

    def has_result(self, checkpoint: str, committed: float) -> bool:
        """Whether any row but a failed one records the commit of `checkpoint` at `committed` (any split, weights)."""
        self._refresh()
        return (checkpoint, committed) in self._commits

    def append(self, rows: list[LedgerRow]) -> list[LedgerRow]:
        """Add rows whose identity is not yet in the ledger; return those added.

        A `failed` record is added unless the evaluation is done or failed before for the same reason.

        Raises:
          WorkdirIOError: the ledger cannot be written (full disk, read-only); it is left as it was.
        """
        try:
            with self.storage.lock(f"{EVAL_DIR}/.ledger.lock", wait=True):
                self._terminate_torn_line()
                self._refresh()
                new = self._new(rows)
                if new:
                    self._write(b"".join(row.to_line() for row in new))
                    self._refresh()
        except OSError as e:
            raise WorkdirIOError(f"cannot write the ledger {self.where}: {e.strerror or e}") from e
        return new

    def _new(self, rows: list[LedgerRow]) -> list[LedgerRow]:
        new: list[LedgerRow] = []
        done: set[tuple[Any, ...]] = set()
        failed: set[tuple[Any, ...]] = set()
        for row in rows:
            r = row.fields
            key = record_key(r)
            known = (key, commit_key(r)) if r.get(FINGERPRINT) is None else (key,)
            if any(k in self._done or k in done for k in known):
                continue
            commit = (r.get("checkpoint"), r.get("committed"))
            if r.get(FINGERPRINT) is None and commit in self._skipped:
                continue  # the trainer recorded this commit as skipped: a `gone` row would say it twice
            if r.get("status") == SKIPPED and commit in self._commits:
                continue  # an evaluator recorded it (`gone`, when it lost the race with the delete)
            if r.get("status") == FAILED:
                mark = (*key, r.get("reason"))
                if mark in self._failed or mark in failed:
                    continue
                failed.add(mark)
            else:
                done.update((key, commit_key(r)))
            new.append(row)
        return new

    def _refresh(self) -> None:
        """Parse the complete lines appended since the last read (all of them if the file was replaced)."""
        read = self.storage.read_from(self.key, self._offset)
        if read is not None and (read[0].origin != self._identity or read[0].size < self._offset):
            read = self.storage.read_from(self.key, 0)
            self._reset(None if read is None else read[0].origin)
        if read is None:
            self._reset(None)
            return
        data = read[1]
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            self._add_line(line)
        self._offset += end
        self._tail = _parse(data[end:]) if data[end:].strip() else None

    def _reset(self, identity: str | None) -> None:
        self._records, self._done, self._failed, self._commits, self._skipped = [], set(), set(), set(), set()
        self._offset, self.skipped, self._identity, self._tail = 0, 0, identity, None

    def _add_line(self, line: bytes) -> None:
        if not line.strip():
            return
        obj = _parse(line)
        if obj is None:
            self.skipped += 1
            return
        self._records.append(obj)
        if obj.get("status") == FAILED:
            self._failed.add((*record_key(obj), obj.get("reason")))
            return
        self._done.update((record_key(obj), commit_key(obj)))
        self._commits.add((obj.get("checkpoint"), obj.get("committed")))
        if obj.get("status") == SKIPPED:
            self._skipped.add((obj.get("checkpoint"), obj.get("committed")))

    def _terminate_torn_line(self) -> None:
        """End a last line that a crashed writer left without its newline, so the next line stays whole."""
        stat = self.storage.stat(self.key)
        if stat is None or stat.size == 0:
            return
        last = self.storage.read_from(self.key, stat.size - 1)
        if last is not None and last[1][-1:] != b"\n":
            self._write(b"\n")

    def _write(self, data: bytes) -> None:
        """Append `data` durably; on failure the file keeps its old length (see `Storage.append`)."""
        self.storage.append(self.key, data)


def _parse(line: bytes) -> Record | None:
    """The row on one line as its JSON object, or None if it is not a ledger row."""
    row = LedgerRow.from_line(line)
    return None if row is None else row.to_json()
