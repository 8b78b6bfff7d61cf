"""Early stopping: after --patience evaluations without improvement, ask the trainer to stop.

The request is `stop_request.json` (common.run.protocol.EarlyStopRequest); the trainer checks for it
after every `--steps-per-loop` steps, saves and finishes.
"""

from __future__ import annotations

import os
import time

from common.errors import WorkdirIOError
from common.layout import STOP_REQUEST_FILE
from common.run.protocol import EarlyStopRequest
from common.storage import Storage
from evaluator.rows import Row
from evaluator.sets import Selection, show_value


def without_improvement(rows: list[Row], *, min_delta: float) -> tuple[int, Row | None]:
    """Evaluations in a row, up to the last, that did not beat the best before them by more than `min_delta`.

    Rows are ranked by their `score` (the deciding metric, turned so that higher is better).
    Returns the count and the best row (the one that last improved).
    """
    best: Row | None = None
    count = 0
    for row in rows:
        if row.score is None:
            continue
        if best is None or best.score is None or row.score > best.score + min_delta:
            best, count = row, 0
        else:
            count += 1
    return count, best


def check_patience(storage: Storage, rows: list[Row], *, selection: Selection, patience: int,
                   min_delta: float) -> str:
    """Ask the trainer to stop if patience ran out; return the request's reason, or "" if not asked.

    Raises:
      WorkdirIOError: the stop request cannot be written.
    """
    count, best = without_improvement(rows, min_delta=min_delta)
    if count < patience or best is None:
        return ""
    last = [r for r in rows if r.score is not None][-1]
    reason = (f"no improvement of more than {min_delta:g} in {count} evaluations (best {selection.set} "
              f"{selection.metric} {show_value(selection.metric, best.value)} at step {best.step}, "
              f"last step {last.step})")
    request_stop(storage, last.step, reason)
    return reason


def request_stop(storage: Storage, step: int | None, reason: str) -> None:
    """Write the stop request for `step`, unless the workdir's request already names that step.

    Raises:
      WorkdirIOError: the stop request cannot be written.
    """
    request = EarlyStopRequest.read(storage)
    if request is not None and request.step == step:
        return
    try:
        EarlyStopRequest(step=step, reason=reason, time=time.time(), pid=os.getpid()).write(storage)
    except OSError as e:
        where = storage.describe(STOP_REQUEST_FILE)
        raise WorkdirIOError(f"cannot write the stop request {where}: {e.strerror or e}") from e
