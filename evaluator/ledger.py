"""`eval/results.jsonl`: every evaluation ever made of a workdir, one JSON object per line.

Each append rewrites the file through a temp file and a rename, under an flock, so a crash never
leaves half a line and two evaluators never lose each other's rows.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.fileio import atomic_write_text
from common.workdir import EVAL_DIR, LEDGER_FILE

Record = dict[str, Any]
# What identifies one evaluation: a checkpoint (name + commit time, since a replaced checkpoint
# keeps its name), the split and the weights.
KEY_FIELDS = ("checkpoint", "committed", "split", "weights")


def record_key(record: Record) -> tuple[Any, ...]:
    """The identity of an evaluation (see KEY_FIELDS)."""
    return tuple(record.get(k) for k in KEY_FIELDS)


class Ledger:
    """Reads and appends the evaluation records of one workdir."""

    def __init__(self, workdir: Path) -> None:
        self.folder = workdir / EVAL_DIR
        self.path = self.folder / LEDGER_FILE

    def read(self) -> list[Record]:
        """All records, oldest first; a line that is not a JSON object is skipped."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        records = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    records.append(obj)
        return records

    def keys(self) -> set[tuple[Any, ...]]:
        """The identities of every recorded evaluation."""
        return {record_key(r) for r in self.read()}

    def append(self, records: list[Record]) -> list[Record]:
        """Add records whose identity is not yet in the ledger; return those added."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._locked():
            existing = self.read()
            seen = {record_key(r) for r in existing}
            new = [r for r in records if record_key(r) not in seen]
            if new:
                lines = [json.dumps(r, sort_keys=True) for r in existing + new]
                atomic_write_text(self.path, "\n".join(lines) + "\n")
        return new

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.folder / ".ledger.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
