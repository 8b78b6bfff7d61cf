"""Turn ledger records into table rows: one per checkpoint, with deltas and the best so far.

Pure functions over ledger records (read through common.run.protocol.LedgerRow), shared by the live
table, the plain log lines and `--once`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Set
from typing import Any

from common.run.ledger import SKIPPED, Record, record_key, version_key
from common.run.protocol import LedgerRow


@dataclasses.dataclass
class Row:
    """One checkpoint's evaluation as shown to a person."""

    step: int | None
    checkpoint: str
    status: str  # ok, gone, error, or failed (a problem of this machine; evaluated again later)
    accuracy: float | None = None  # of the primary weights (EMA unless only raw was asked)
    raw_accuracy: float | None = None  # with --weights both
    loss: float | None = None
    delta: float | None = None  # accuracy change against the previous ok row
    best: bool = False
    eval_secs: float | None = None
    lag_secs: float | None = None  # commit to result
    reason: str = ""
    per_class: list[float | None] = dataclasses.field(default_factory=list)
    evaluator: str = ""  # who evaluated it ("" in rows older than the field)
    here: bool = False  # evaluated by this evaluator run (the others were read from the ledger)


def build_rows(records: list[Record], *, split: str, weights: tuple[str, ...],
               mine: Set[tuple[Any, ...]] = frozenset()) -> list[Row]:
    """Rows for the records of `split`, in the order the checkpoints were committed.

    `mine`: the record keys (common.run.ledger.record_key) this evaluator run appended itself.
    """
    groups: dict[tuple[Any, ...], dict[str, Record]] = {}
    for r in records:
        if r.get("status") == SKIPPED:  # the trainer's row: for every split and weights
            r = r | {"split": split, "weights": weights[0]}
        if r.get("split") == split and r.get("weights") in weights:
            # A later record of the same evaluation (ok after failed) replaces the earlier one.
            groups.setdefault(version_key(r), {})[r["weights"]] = r
    ordered = sorted(groups.values(), key=lambda g: (next(iter(g.values())).get("committed") or 0))
    rows = [_row(g, weights, mine) for g in ordered if weights[0] in g]
    _mark(rows)
    return rows


def _row(group: dict[str, Record], weights: tuple[str, ...], mine: Set[tuple[Any, ...]]) -> Row:
    main = LedgerRow(group[weights[0]])
    row = Row(step=main.step, checkpoint=main.checkpoint, status=main.status, reason=main.reason,
              eval_secs=main.eval_secs, evaluator=main.evaluator, here=record_key(main.fields) in mine)
    if row.status == "ok":
        row.accuracy, row.loss = main.accuracy, main.loss
        row.per_class = main.per_class_accuracy
        raw = LedgerRow(group["raw"]) if "raw" in group else None
        if raw is not None and len(weights) > 1 and raw.status == "ok":
            row.raw_accuracy = raw.accuracy
    if main.finished and main.committed:
        row.lag_secs = main.finished - main.committed
    return row


def _mark(rows: list[Row]) -> None:
    previous: float | None = None
    best: Row | None = None
    for row in rows:
        if row.accuracy is None:
            continue
        row.delta = None if previous is None else row.accuracy - previous
        previous = row.accuracy
        if best is None or row.accuracy > (best.accuracy or 0.0):  # ties keep the earlier step
            best = row
    if best is not None:
        best.best = True

