"""Turn ledger records into table rows: one per checkpoint, with its result on each set, deltas and the best so far.

Pure functions over ledger records (read through common.run.protocol.LedgerRow), shared by the live
table, the plain log lines and `--once`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Set
from typing import Any

from common.run.ledger import SKIPPED, Record, record_key, version_key
from common.run.protocol import LedgerRow
from evaluator.sets import Selection


@dataclasses.dataclass
class SetResult:
    """One checkpoint's result on one evaluation set."""

    status: str
    accuracy: float | None = None  # of the primary weights (EMA unless only raw was asked)
    raw_accuracy: float | None = None  # with --weights both
    loss: float | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # top-k accuracy and users' metrics
    per_class: list[float | None] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Row:
    """One checkpoint's evaluation as shown to a person; its headline fields are the deciding set's."""

    step: int | None
    checkpoint: str
    status: str  # ok, gone, error, skipped, or failed (a problem of this machine; evaluated again later)
    accuracy: float | None = None  # of the primary weights (EMA unless only raw was asked)
    raw_accuracy: float | None = None  # with --weights both
    loss: float | None = None
    delta: float | None = None  # change of the deciding metric against the previous ok row
    best: bool = False
    eval_secs: float | None = None
    lag_secs: float | None = None  # commit to result
    reason: str = ""
    per_class: list[float | None] = dataclasses.field(default_factory=list)
    evaluator: str = ""  # who evaluated it ("" in rows older than the field)
    here: bool = False  # evaluated by this evaluator run (the others were read from the ledger)
    value: float | None = None  # the deciding metric (--select; validation accuracy by default)
    score: float | None = None  # `value` turned so that higher is better
    sets: dict[str, SetResult] = dataclasses.field(default_factory=dict)  # every set's result, by name
    headline: str = ""  # the set whose result the headline fields give (the deciding one when it has a row)


def build_rows(records: list[Record], *, sets: tuple[str, ...], selection: Selection | None,
               weights: tuple[str, ...], mine: Set[tuple[Any, ...]] = frozenset()) -> list[Row]:
    """Rows for the records of `sets`, in the order the checkpoints were committed.

    `selection` ranks the rows (the best, the deltas); when None, the first set's accuracy does,
    for display only. `mine`: the record keys (common.run.ledger.record_key) this evaluator run
    appended itself.
    """
    rank = selection or Selection(sets[0])
    groups: dict[tuple[Any, ...], dict[tuple[str, str], Record]] = {}
    for r in records:
        if r.get("status") == SKIPPED:  # the trainer's row: for every set and weights
            for name in sets:
                groups.setdefault(version_key(r), {})[(name, weights[0])] = r | {"split": name, "weights": weights[0]}
        elif r.get("split") in sets and r.get("weights") in weights:
            # A later record of the same evaluation (ok after failed) replaces the earlier one.
            groups.setdefault(version_key(r), {})[(r["split"], r["weights"])] = r
    ordered = sorted(groups.values(), key=lambda g: (next(iter(g.values())).get("committed") or 0))
    rows = [_row(g, sets, rank, weights, mine) for g in ordered if any((s, weights[0]) in g for s in sets)]
    _mark(rows)
    return rows


def _row(group: dict[tuple[str, str], Record], sets: tuple[str, ...], rank: Selection, weights: tuple[str, ...],
         mine: Set[tuple[Any, ...]]) -> Row:
    main_set = rank.set if (rank.set, weights[0]) in group else next(s for s in sets if (s, weights[0]) in group)
    main = LedgerRow(group[(main_set, weights[0])])
    row = Row(step=main.step, checkpoint=main.checkpoint, status=main.status, reason=main.reason,
              eval_secs=main.eval_secs, evaluator=main.evaluator, here=record_key(main.fields) in mine)
    row.sets = {s: _result(group, s, weights) for s in sets if (s, weights[0]) in group}
    row.headline = main_set
    if row.status == "ok":
        headline = row.sets[main_set]
        row.accuracy, row.raw_accuracy, row.loss, row.per_class = (headline.accuracy, headline.raw_accuracy,
                                                                   headline.loss, headline.per_class)
        if main_set == rank.set:
            row.value, row.score = rank.value(main.fields), rank.score(main.fields)
    if main.finished and main.committed:
        row.lag_secs = main.finished - main.committed
    return row


def _result(group: dict[tuple[str, str], Record], name: str, weights: tuple[str, ...]) -> SetResult:
    main = LedgerRow(group[(name, weights[0])])
    result = SetResult(status=main.status)
    if main.status != "ok":
        return result
    result.accuracy, result.loss, result.per_class = main.accuracy, main.loss, main.per_class_accuracy
    extra = main.fields.get("metrics")
    result.metrics = dict(extra) if isinstance(extra, dict) else {}
    raw = LedgerRow(group[(name, "raw")]) if (name, "raw") in group else None
    if raw is not None and len(weights) > 1 and raw.status == "ok":
        result.raw_accuracy = raw.accuracy
    return result


def _mark(rows: list[Row]) -> None:
    previous: float | None = None
    best: Row | None = None
    for row in rows:
        if row.score is None or row.value is None:
            continue
        row.delta = None if previous is None else row.value - previous
        previous = row.value
        if best is None or best.score is None or row.score > best.score:  # ties keep the earlier step
            best = row
    if best is not None:
        best.best = True
