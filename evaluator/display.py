"""What a person sees: a live Rich table on a terminal, one plain line per evaluation elsewhere.

Displays consume rows and status dicts; they never compute anything the ledger does not hold.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any, Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from evaluator.rows import Row, SetResult
from evaluator.sets import is_fraction

# Checkpoints deleted before they could be read have no numbers: past this many, the table shows
# only the newest (a state file listing 10,000 missing names would otherwise print 10,000 empty rows).
MAX_GONE_ROWS = 100


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return ""
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _secs(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


class Display(Protocol):
    def update(self, rows: list[Row], status: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


def _without_old_gone(rows: list[Row]) -> tuple[list[Row], int]:
    """The rows with only the newest MAX_GONE_ROWS `gone` ones; and how many were left out."""
    gone = [i for i, row in enumerate(rows) if row.status in ("gone", "skipped")]
    hidden = set(gone[:-MAX_GONE_ROWS])
    return [row for i, row in enumerate(rows) if i not in hidden], len(hidden)


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the table shows: a column group per set, raw weights beside EMA, extra metrics' columns."""

    sets: tuple[str, ...] = ("validation",)
    both: bool = False  # --weights both: raw accuracy and the EMA-raw difference too
    metrics: tuple[str, ...] = ()  # top-k accuracy and users' metrics, in the order computed
    decides: str = "accuracy"  # the metric whose change Δprev shows

    def set_columns(self) -> list[str]:
        """The columns of one set's group, without the set's name."""
        names = ["acc% ema", "acc% raw", "ema-raw"] if self.both else ["acc%"]
        return [*names, "loss", *(_short_metric(m) for m in self.metrics)]

    def columns(self) -> list[str]:
        """Every column, each set's group headed by its name when there are several sets."""
        groups = [self.set_columns()] if len(self.sets) == 1 else \
            [[f"{name}\n{column}" for column in self.set_columns()] for name in self.sets]
        return ["step", "checkpoint", *(c for g in groups for c in g),
                "Δprev", "best", "eval s", "lag s", "evaluator", "status"]

    def set_cells(self, result: SetResult | None) -> list[str]:
        if result is None or result.status != "ok":
            return [""] * len(self.set_columns())
        cells = [_pct(result.accuracy)]
        if self.both:
            diff = None if result.accuracy is None or result.raw_accuracy is None else \
                result.accuracy - result.raw_accuracy
            cells += [_pct(result.raw_accuracy), _pct(diff, signed=True)]
        cells.append("" if result.loss is None else f"{result.loss:.4f}")
        return cells + [_metric_cell(m, result.metrics.get(m)) for m in self.metrics]


def _short_metric(metric: str) -> str:
    """A metric's column title: `top5%` for top-5 accuracy, else its name."""
    return f"{metric.removesuffix('_accuracy')}%" if is_fraction(metric) and metric != "accuracy" else metric


def _metric_cell(metric: str, value: float | None, signed: bool = False) -> str:
    if value is None:
        return ""
    if is_fraction(metric):
        return _pct(value, signed=signed)
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def render_table(rows: list[Row], layout: Layout = Layout(), *, limit: int | None = None) -> Table:
    """The results table; only the last `limit` rows when given, and only the newest `gone` rows."""
    table = Table(expand=False, header_style="bold")
    rows, hidden_gone = _without_old_gone(rows)
    for name in layout.columns():
        table.add_column(name, justify="left" if name in ("checkpoint", "status") else "right",
                         no_wrap=name != "status")
    shown = rows if limit is None or len(rows) <= limit else rows[-limit:]
    captions = [f"{len(rows) - len(shown)} earlier rows not shown"] if len(shown) < len(rows) else []
    if any(row.here for row in shown):
        captions.append("evaluator * is this one; the other rows were read from the ledger")
    if hidden_gone:
        captions.append(f"{hidden_gone:,} earlier gone or skipped rows not shown (the ledger and --json hold them)")
    if captions:
        table.caption = "; ".join(captions)
    for row in shown:
        cells = [str(row.step if row.step is not None else "?"), row.checkpoint]
        for name in layout.sets:
            cells += layout.set_cells(row.sets.get(name))
        status = row.status if row.status == "ok" else f"{row.status}: {row.reason}"
        cells += [_metric_cell(layout.decides, row.delta, signed=True), "★" if row.best else "",
                  _secs(row.eval_secs), _secs(row.lag_secs), _who(row), status]
        table.add_row(*cells, style=None if row.status == "ok" else "yellow")
    return table


def _who(row: Row) -> str:
    """The evaluator column: who evaluated the row, `*` marking this evaluator's own rows."""
    return f"{row.evaluator} *" if row.here else row.evaluator


def header_text(status: dict[str, Any]) -> Text:
    """The lines above the table: workdir, run, trainer status, backlog, warnings."""
    text = Text()
    text.append(f"{status.get('workdir')}", style="bold")
    if status.get("run"):
        text.append(f"  {status['run']}")
    text.append(f"\ntrainer: {status.get('trainer', 'unknown')}   backlog: {status.get('backlog', 0)}")
    if status.get("state"):
        text.append(f"   {status['state']}")
    for warning in status.get("warnings", []):
        text.append(f"\n⚠ {warning}", style="yellow")
    return text


def per_class_tables(rows: list[Row], status: dict[str, Any]) -> list[Table]:
    """With --per-class: accuracy per class of the newest and of the best checkpoint, a table per set."""
    names = status.get("class_names") or []
    if not status.get("per_class") or not names:
        return []
    tables = []
    for set_name in dict.fromkeys(s for r in rows for s in r.sets):
        ok = [r for r in rows if set_name in r.sets and r.sets[set_name].per_class]
        if not ok:
            continue
        latest, best = ok[-1], next((r for r in ok if r.best), ok[-1])
        table = Table(title=f"per-class accuracy % ({set_name})", header_style="bold")
        table.add_column("class")
        table.add_column(f"latest ({latest.checkpoint})", justify="right")
        table.add_column(f"best ({best.checkpoint})", justify="right")
        for i, name in enumerate(names):
            table.add_row(name, _pct(_at(latest.sets[set_name].per_class, i)),
                          _pct(_at(best.sets[set_name].per_class, i)))
        tables.append(table)
    return tables


def _at(values: list[float | None], i: int) -> float | None:
    return values[i] if i < len(values) else None


class LiveTable:
    """A Rich Live view that redraws the header and the table on every update."""

    def __init__(self, layout: Layout = Layout(), *, console: Console | None = None) -> None:
        self.console = console or Console()
        self.layout = layout
        self.live = Live(Text("starting"), console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def update(self, rows: list[Row], status: dict[str, Any]) -> None:
        extra = per_class_tables(rows, status)
        limit = max(5, self.console.size.height - 10 - 14 * len(extra))
        self.live.update(Group(header_text(status), render_table(rows, self.layout, limit=limit), *extra))

    def message(self, text: str) -> None:
        self.live.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self.live.stop()


def log_line(event: str, **fields: Any) -> str:
    """The evaluator's one greppable plain format: `<time> evaluator <event> key=value ...`."""
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items() if v is not None]
    return " ".join([time.strftime("%Y-%m-%dT%H:%M:%S"), "evaluator", event, *parts])


def _other_sets(row: Row) -> dict[str, Any]:
    """Each set's other figures as `<set>.<metric>`: with several sets, their accuracy and loss; always, the
    extra metrics (top-k accuracy, users' metrics). The dot keeps them apart from the line's own keys."""
    fields: dict[str, Any] = {"set": row.headline} if len(row.sets) > 1 else {}
    for name, result in row.sets.items():
        if len(row.sets) > 1 and name != row.headline:
            fields |= {f"{name}.accuracy": result.accuracy, f"{name}.loss": result.loss}
        fields |= {f"{name}.{metric}": value for metric, value in result.metrics.items()}
    return fields


class PlainLines:
    """One line per new evaluation and per change of status, for logs and pipes."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self._printed: set[tuple[str, str]] = set()
        self._last_state = ""

    def update(self, rows: list[Row], status: dict[str, Any]) -> None:
        for row in rows:
            key = (row.checkpoint, f"{row.step}:{row.status}:{row.eval_secs}:{','.join(row.sets)}")
            if key in self._printed:
                continue
            self._printed.add(key)
            self._print(log_line(
                "result", step=row.step, checkpoint=row.checkpoint, status=row.status,
                accuracy=row.accuracy, raw_accuracy=row.raw_accuracy, loss=row.loss, delta=row.delta,
                **_other_sets(row),
                best="yes" if row.best else None, eval_secs=row.eval_secs, lag_secs=row.lag_secs,
                evaluator=json.dumps(row.evaluator) if row.evaluator else None, here="yes" if row.here else None,
                reason=json.dumps(row.reason) if row.reason else None))
        state = status.get("state", "")
        if state and state != self._last_state:
            self._print(log_line("status", message=json.dumps(state)))
        self._last_state = state

    def message(self, text: str) -> None:
        self._print(text)

    def close(self) -> None:
        pass

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
