"""The evaluator's loops: `watch` (a daemon woken by filesystem events) and `once` (for scripts).

Both drive a `Session` (evaluator.session); the watch loop only turns wake-ups (evaluator.wakeups)
into scans of the state file, and shows the table and its header after each step.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from common.checkpoint.checkpoints import CheckpointError
from common.errors import ProjectError, UsageError
from common.layout import DONE_FILE
from common.run.ledger import SKIPPED, record_key
from common.run.workdir import Workdir
from common.signals import StopRequest
from evaluator.cluster import Cluster
from evaluator.config import EvalConfig, require_folder
from evaluator.core import CheckpointEvaluator
from evaluator.display import Display, log_line
from evaluator.session import Candidate, Session
from evaluator.sets import SET_ERRORS
from evaluator.tf1core import FLAG_ERRORS
from evaluator.wakeups import Wake, watching

SETTLE_QUIET_SECS = 0.02  # a save writes the state file once; wait this long for more events
SETTLE_MAX_SECS = 0.2
T = TypeVar("T")
CLAIM_RETRY_SECS = 0.25  # how often --once looks again at checkpoints other evaluators are evaluating
WORKER_RETRY_SECS = 2.0  # a worker of a multi-worker evaluation looks again this often for a run to evaluate


def run_once(cfg: EvalConfig, workdir: Workdir | None = None, *, cluster: Cluster | None = None) -> Session:
    """Evaluate everything pending (or the newest with --policy latest) and return the session.

    `cluster`: the strategy and the other processes to evaluate with (made from `cfg` when not given).

    Raises:
      UsageError: no run.json, an unknown model, no checkpoint at all, or the workdir is a file.
      CheckpointError: the state file is unreadable.
      WorkdirIOError: the evaluator's files in the workdir cannot be written.
    """
    require_folder(cfg.workdir)
    session = Session(cfg, workdir, cluster=cluster)
    session.prepare()
    listed = session.listed()
    if not listed:
        raise UsageError(f"{cfg.workdir}: no checkpoint to evaluate (no state file, or it lists none)")
    with contextlib.closing(session), session.register():
        session.clean()
        waiting: set[str] = set()
        tried: set[Candidate] = set()  # each is evaluated at most once by this run, whatever its result
        while todo := [c for c in session.pending(listed) if c not in tried]:
            session.elsewhere.clear()
            for cand in todo:
                if cand.on_disk and _evaluate_if_claimed(session, cand):
                    tried.add(cand)
            session.record_unread([c for c in todo if not c.on_disk])
            tried.update(c for c in todo if not c.on_disk)
            if not session.elsewhere:
                break
            # Other evaluators are on the rest: wait for their rows, or for a claim its holder's death frees.
            _say_waiting(session, waiting)
            session.cluster.keep_alive()  # the workers of a multi-worker evaluation wait in a collective
            time.sleep(CLAIM_RETRY_SECS)
        session.sync_best()
    return session


def _evaluate_if_claimed(session: Session, cand: Candidate) -> bool:
    """Evaluate `cand` if this evaluator gets its claim and it is still pending; return whether it did."""
    with session.claim(cand) as mine:
        if mine:
            session.evaluate(cand)
        return mine


def _say_waiting(session: Session, said: set[str]) -> None:
    """Say once per checkpoint which other evaluator --once is waiting for."""
    for cand, holder in session.elsewhere.items():
        if cand.name not in said:
            said.add(cand.name)
            print(f"evaluator: waiting for {Path(cand.name).name}, which {holder} is evaluating", file=sys.stderr)


def json_lines(session: Session) -> str:
    """The ledger's records for these sets and weights, one JSON object per line.

    Each says whether this run evaluated it (`evaluated_here`) or read it from the ledger.
    """
    records = [r | {"evaluated_here": record_key(r) in session.mine} for r in session.ledger.read()
               if (r.get("split") in session.cfg.set_names and r.get("weights") in session.weights)
               or r.get("status") == SKIPPED]
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)


def run_watch(cfg: EvalConfig, display: Display, stop: StopRequest, workdir: Workdir | None = None, *,
              cluster: Cluster | None = None) -> None:
    """Evaluate every checkpoint the trainer commits until stopped (or done, with --exit-when-done)."""
    session = Session(cfg, workdir, cluster=cluster)
    wake = Wake()
    stop.on_set.append(wake.set)
    while not stop and not session.workdir.storage.exists():
        require_folder(cfg.workdir)
        display.update([], session.status(0) | {"state": f"waiting for {cfg.workdir} to appear"})
        wake.wait(0.5)
    if stop:
        return
    # Flags that no later state of the workdir mends (FLAG_ERRORS, SET_ERRORS) stop here, before any write.
    _attempt(session, session.prepare)
    with contextlib.closing(session), session.register(), \
            watching(session.workdir.storage, wake, poll=cfg.poll, poll_secs=cfg.poll_secs):
        session.clean()
        show = _Refresh(session, display, wake)
        show("waiting for the trainer" if session.problem else "watching", 0)
        scan = True
        while not stop:
            if scan:  # otherwise nothing can have changed, and only the header's trainer line is refreshed
                if _evaluate_next(session, show, stop):
                    continue
                session.sync_best()
                # Done when nothing is left to anyone: an evaluator that another one's death leaves work to stays.
                if cfg.exit_when_done and not session.problem and not session.elsewhere and \
                        session.workdir.storage.stat(DONE_FILE):
                    show(_finished_state(session), 0)
                    return
            show("waiting for the trainer" if session.problem else "watching", 0)
            scan = _wait(session, wake)


def _evaluate_next(session: Session, show: _Refresh, stop: StopRequest) -> bool:
    """Rescan the workdir and evaluate the oldest pending checkpoint that no other evaluator holds.

    False when none is left to this evaluator (or it is stopping).
    """
    todo = _scan(session)
    session.elsewhere.clear()
    for i, cand in enumerate(todo):
        if stop:
            return False
        if not cand.on_disk:  # the rest are names without files too (see Session.pending)
            session.record_unread(todo[i:])
            return True
        with session.claim(cand) as mine:
            if mine:
                show(f"evaluating {cand.name}", len(todo))
                session.evaluate(cand)
                return True
    return False


def _wait(session: Session, wake: Wake) -> bool:
    """Wait for a notice or --rescan-secs; return whether to rescan the workdir.

    A local workdir is rescanned either way (inotify may lose events). A bucket's poller misses no
    commit, so there only a notice, a checkpoint that failed for a reason here or a problem shown
    (which may have been a network error) is worth the rescan's requests, whose number grows with
    the checkpoints listed.
    """
    session.cluster.keep_alive()
    # Checkpoints other evaluators hold are looked at again soon: a holder that dies leaves them to this one.
    wait = CLAIM_RETRY_SECS * 4 if session.elsewhere else session.cfg.rescan_secs
    noticed = wake.wait(min(wait, session.cluster.longest_wait))
    if noticed:
        wake.settle(SETTLE_QUIET_SECS, SETTLE_MAX_SECS)
    retry = bool(session.deferred)
    session.deferred.clear()  # a new scan cycle: retry what failed in the last one
    return noticed or retry or bool(session.problem or session.elsewhere) or \
        not session.workdir.storage.polls_state_file_only


class _Refresh:
    """Update the display, after printing new one-off warnings in the log format."""

    def __init__(self, session: Session, display: Display, wake: Wake) -> None:
        self.session, self.display, self.wake = session, display, wake

    def __call__(self, state: str, backlog: int) -> None:
        for _ in range(self.wake.take_overflows()):
            self.session.note("the inotify queue overflowed and filesystem events were lost: rescanning the workdir")
        for message in self.session.unsent:
            self.display.message(log_line("warning", message=json.dumps(message)))
        self.session.unsent.clear()
        self.display.update(self.session.rows(), self.session.status(backlog) | {"state": state})


def _finished_state(session: Session) -> str:
    if session.deferred:
        return (f"trainer finished; {len(session.deferred)} checkpoint(s) could not be evaluated "
                "because of a problem here (see the warnings)")
    return "trainer finished; all evaluated"


def _scan(session: Session) -> list[Candidate]:
    """Pending checkpoints, or none while the workdir is not usable yet (the problem is shown)."""
    def pending() -> list[Candidate]:
        session.prepare()
        return session.pending(session.listed())

    return _attempt(session, pending) or []


def _attempt(session: Session, action: Callable[[], T]) -> T | None:
    """`action()`, or None while the workdir is not usable yet: its problem is kept for the header.

    Flags that no later state of the workdir mends (FLAG_ERRORS, SET_ERRORS) raise instead.
    """
    try:
        result = action()
    except FLAG_ERRORS + SET_ERRORS:
        raise
    except (ProjectError, CheckpointError) as e:
        session.problem = str(e)
        return None
    session.problem = ""
    return result


def run_worker(cfg: EvalConfig, workdir: Workdir, cluster: Cluster, *, wait: bool) -> int:
    """A worker of a multi-worker evaluation: take part in each one the chief leads, until it is done.

    It writes nothing into the workdir but its pinned copies. With `wait` (watch mode) it waits,
    as the chief does, for a run.json and data to evaluate with. Returns how many checkpoints it took part in.
    """
    session = Session(cfg, workdir, cluster=cluster)
    with contextlib.closing(session):
        core = _worker_core(session, wait=wait)
        taken = 0
        while not (order := cluster.listen()).done:
            if order.step is not None:
                core.take_part(order)
                taken += 1
    return taken


def _worker_core(session: Session, *, wait: bool) -> CheckpointEvaluator:
    """The worker's evaluation core, made as the chief makes its own (retried while `wait` and not ready)."""
    while True:
        try:
            core = session.prepare()
        except FLAG_ERRORS + SET_ERRORS:
            raise
        except (ProjectError, CheckpointError):
            if not wait:
                raise
            time.sleep(min(session.cfg.rescan_secs, WORKER_RETRY_SECS))
            continue
        assert isinstance(core, CheckpointEvaluator)  # EvalConfig takes multi-worker for this project's runs only
        return core
