"""The evaluator's loops: `watch` (a daemon woken by filesystem events) and `once` (for scripts).

Both share `Session`: list the checkpoints the state file names, drop those the ledger already
holds (matched by name and `.index` content), evaluate the rest oldest first (or only the newest),
append the results to the ledger. Listed names without files are recorded in one batch at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from common import checkpoints, models
from common.checkpoints import CheckpointError
from common.errors import ProjectError, UsageError, WorkdirIOError
from common.fileio import atomic_write_json
from common.runconfig import RunSpec, read_run
from common.signals import StopRequest
from common.workdir import DONE_FILE, HEARTBEAT_FILE, STOP_REQUEST_FILE, TB_DIR, read_best, read_json
from evaluator.best import catch_up, clean_stale, improves, promote
from evaluator.core import WEIGHT_CHOICES, CheckpointEvaluator
from evaluator.display import Display, log_line
from evaluator.ledger import FAILED, Ledger, Record, candidate_keys
from evaluator.rows import Row, build_rows, without_improvement
from evaluator.snapshot import lease
from evaluator.tensorboard import TensorBoardSink
from evaluator.watch import Wake, watching

SETTLE_QUIET_SECS = 0.02  # a save writes the state file once; wait this long for more events
SETTLE_MAX_SECS = 0.2
MAX_INTERVAL_SECS = 86400.0  # --rescan-secs, --poll-secs and --silent-secs: longer than a day is a typo
MAX_NOTES = 5  # one-off warnings kept in the header


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Everything one `evaluator` invocation needs."""

    workdir: Path  # the trainer's workdir
    split: str = "validation"  # validation or test
    weights: str = "ema"  # ema, raw or both
    policy: str = "all"  # all: every pending checkpoint, oldest first; latest: only the newest
    data_dir: str | None = None  # folder with the IDX files; None = the usual places
    rescan_secs: float = 10.0  # rescan this often even without events
    poll: bool = False  # use watchdog's polling observer (network filesystems)
    poll_secs: float = 1.0  # interval of the polling observer
    exit_when_done: bool = False  # watch mode: exit after the finished run's last checkpoint
    silent_secs: float = 120.0  # warn when the trainer's heartbeat is older than this
    patience: int = 0  # ask the trainer to stop after this many evaluations without improvement; 0 = off
    min_delta: float = 0.0  # an improvement must beat the best accuracy by more than this
    per_class: bool = False  # show per-class accuracy under the live table

    def __post_init__(self) -> None:
        choices = {"split": ("validation", "test"), "weights": tuple(WEIGHT_CHOICES), "policy": ("all", "latest")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UsageError(f"--{name} ({getattr(self, name)!r}) must be one of: {', '.join(allowed)}")
        for name in ("rescan_secs", "poll_secs", "silent_secs"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 < value <= MAX_INTERVAL_SECS):
                raise UsageError(f"--{name.replace('_', '-')} ({value}) must be positive and at most "
                                 f"{MAX_INTERVAL_SECS:.0f} seconds (one day)")
        if not math.isfinite(self.min_delta):
            raise UsageError(f"--min-delta ({self.min_delta}) must be a finite number")
        if self.patience < 0 or self.min_delta < 0:
            raise UsageError(f"--patience ({self.patience}) and --min-delta ({self.min_delta}) must not be negative")
        if self.patience and self.split != "validation":
            raise UsageError("--patience watches the validation split; drop --split test")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A checkpoint the state file lists."""

    name: str
    committed: float  # the state file's timestamp for it (index mtime when it has none)
    fingerprint: str | None = None  # of its .index file (common.checkpoints.index_fingerprint); None = not there

    @property
    def step(self) -> int | None:
        return checkpoints.step_of(self.name)

    @property
    def on_disk(self) -> bool:
        """Whether its files were there when listed (else it is recorded without a snapshot)."""
        return self.fingerprint is not None


class Session:
    """State shared by one evaluator run: its config, ledger and (once ready) evaluation core."""

    def __init__(self, cfg: EvalConfig) -> None:
        self.cfg = cfg
        self.ledger = Ledger(cfg.workdir)
        self.weights = WEIGHT_CHOICES[cfg.weights]
        self.core: CheckpointEvaluator | None = None
        self.spec: RunSpec | None = None
        self.first_seen: dict[Candidate, float] = {}
        self.problem = ""  # the current setup or state-file problem, shown until it clears
        self.tensorboard = TensorBoardSink(cfg.workdir / TB_DIR / "eval")
        self.stop_requested = ""  # the reason of the stop request this session wrote, if any
        self.notes: list[str] = []  # one-off warnings (refused deletes, lost events), newest last
        self.unsent: list[str] = []  # notes the watch loop has not printed yet
        self.best_problem = ""  # why the newest improvement is not eval/best yet
        self.deferred: set[Candidate] = set()  # failed in this scan cycle: retried in the next one
        self._fingerprints: dict[Path, tuple[tuple[int, int, int], str | None]] = {}

    def prepare(self) -> CheckpointEvaluator:
        """Build the model from run.json and load the split (once)."""
        if self.core is None:
            spec = read_run(self.cfg.workdir)
            if spec is None:
                raise UsageError(f"{self.cfg.workdir}: no run.json (not a trainer workdir, or no trainer started yet)")
            if spec.model not in models.MODELS:
                raise UsageError(f"{self.cfg.workdir}/run.json: unknown model {spec.model!r}")
            data = spec.load_data(self.cfg.data_dir)
            self.core = CheckpointEvaluator(self.cfg.workdir, spec, data.split(self.cfg.split),
                                            split_name=self.cfg.split, weights=self.cfg.weights)
            self.spec = spec
        return self.core

    def listed(self) -> list[Candidate]:
        """The checkpoints the state file lists, in commit order. Raises CheckpointError if unreadable."""
        state = checkpoints.read_state(self.cfg.workdir)
        if state is None:
            return []
        names = list(state.paths) if state.latest in state.paths else [*state.paths, state.latest or ""]
        stamps = state.timestamps_by_path()
        found = []
        for name in names:
            prefix = checkpoints.resolve(self.cfg.workdir, name)
            fingerprint = self._fingerprint(prefix) if checkpoints.inside(self.cfg.workdir, name) else None
            found.append(Candidate(name, stamps.get(name) or _index_mtime(prefix), fingerprint))
        now = time.time()
        for cand in found:
            self.first_seen.setdefault(cand, now)
        return sorted(found, key=lambda c: (c.committed, c.step or 0))

    def _fingerprint(self, prefix: Path) -> str | None:
        """The .index fingerprint, read again only when the file's size, mtime or inode changed."""
        try:
            st = os.stat(f"{prefix}.index")
        except OSError:
            return None
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        cached = self._fingerprints.get(prefix)
        if cached is None or cached[0] != stamp:
            cached = self._fingerprints[prefix] = (stamp, checkpoints.index_fingerprint(prefix))
        return cached[1]

    def pending(self, listed: list[Candidate]) -> list[Candidate]:
        """What is still to evaluate under the policy: checkpoints on disk first, in commit order.

        Listed names without files (deleted, or junk in an edited state file) come last and are
        recorded in one batch (`record_unread`), so they never hold up a real checkpoint.
        """
        done = self.ledger.keys()

        def recorded(c: Candidate, weights: str) -> bool:
            keys = candidate_keys(Path(c.name).name, fingerprint=c.fingerprint, committed=c.committed,
                                  split=self.cfg.split, weights=weights)
            return any(k in done for k in keys)

        todo = [c for c in listed if c not in self.deferred and not all(recorded(c, w) for w in self.weights)]
        if self.cfg.policy == "latest":
            todo = [c for c in todo if listed and c == listed[-1]]
        return sorted(todo, key=lambda c: not c.on_disk)

    def evaluate(self, cand: Candidate) -> list[Record]:
        """Evaluate one checkpoint and record it; return the records added to the ledger.

        Raises:
          WorkdirIOError: the lease or the ledger cannot be written.
        """
        core = self.prepare()
        added: list[Record] = []
        recorded = False

        def record_then_keep(private: Path, records: list[Record]) -> None:
            # The ledger first: a failed append must not leave best.json naming an unrecorded checkpoint.
            nonlocal recorded
            added.extend(self.ledger.append(records))
            recorded = True
            self._keep_if_best(private, records[0])

        with lease(self.cfg.workdir, Path(cand.name).name):
            records = core.evaluate(cand.name, committed=cand.committed, fingerprint=cand.fingerprint,
                                    detected=self.first_seen.get(cand, time.time()), keep=record_then_keep)
        if not recorded:
            added.extend(self.ledger.append(records))
        if records[0].get("status") == FAILED:
            self.deferred.add(cand)
        return self._after(added)

    def record_unread(self, cands: list[Candidate]) -> list[Record]:
        """Record listed checkpoints whose files are not there (`gone`, or `error` outside the workdir) at once."""
        if not cands:
            return []
        core = self.prepare()
        records = [r for c in cands for r in core.unread(c.name, committed=c.committed,
                                                         detected=self.first_seen.get(c, time.time()))]
        return self._after(self.ledger.append(records))

    def _after(self, added: list[Record]) -> list[Record]:
        self.tensorboard.write(added)
        if self.cfg.patience:
            self._check_patience()
        return added

    def _keep_if_best(self, private: Path, main: Record) -> None:
        """Promote the evaluated files to eval/best when they beat the best validation accuracy."""
        if main["split"] == "validation" and improves(main, read_best(self.cfg.workdir)):
            try:
                promote(self.cfg.workdir, private, main, warn=self.note)
            except OSError as e:
                self.best_problem = (f"could not make {main['checkpoint']} the best checkpoint "
                                     f"({e.strerror or e}); retried at the next scan")
            else:
                self.best_problem = ""

    def sync_best(self) -> None:
        """Retry a promotion that failed or was cut short: make the ledger's best result eval/best."""
        if self.cfg.split != "validation":
            return
        try:
            catch_up(self.cfg.workdir, self.ledger.read(), weights=self.weights[0], warn=self.note)
        except OSError as e:
            self.best_problem = f"could not update eval/best ({e.strerror or e}); retried at the next scan"
        else:
            self.best_problem = ""

    def note(self, message: str) -> None:
        """Keep a one-off warning for the header, and for the watch loop to print once."""
        if message not in self.notes:
            self.notes = [*self.notes, message][-MAX_NOTES:]
            self.unsent.append(message)

    def clean(self) -> None:
        """Remove what earlier evaluators left behind (see evaluator.best.clean_stale)."""
        clean_stale(self.cfg.workdir, warn=self.note)

    def _check_patience(self) -> None:
        rows = self.rows()
        count, best = without_improvement(rows, min_delta=self.cfg.min_delta)
        if count < self.cfg.patience or best is None:
            return
        last = [r for r in rows if r.accuracy is not None][-1]
        reason = (f"no improvement of more than {self.cfg.min_delta:g} in {count} evaluations "
                  f"(best {100 * (best.accuracy or 0):.2f}% at step {best.step}, last step {last.step})")
        path = self.cfg.workdir / STOP_REQUEST_FILE
        request = read_json(path)
        if request is None or request.get("step") != last.step:
            try:
                atomic_write_json(path, {"step": last.step, "reason": reason, "time": time.time(), "pid": os.getpid()})
            except OSError as e:
                raise WorkdirIOError(f"cannot write the stop request {path}: {e.strerror or e}") from e
        self.stop_requested = reason

    def close(self) -> None:
        self.tensorboard.close()

    def rows(self) -> list[Row]:
        return build_rows(self.ledger.read(), split=self.cfg.split, weights=self.weights)

    def status(self, backlog: int) -> dict[str, Any]:
        """The header: workdir, run, trainer status, backlog and warnings."""
        warnings = [self.problem] if self.problem else []
        trainer, silent = trainer_status(self.cfg.workdir, self.cfg.silent_secs)
        if silent:
            warnings.append(silent)
        if self.stop_requested:
            warnings.append(f"asked the trainer to stop: {self.stop_requested}")
        warnings += self._result_warnings()
        run = ""
        if self.spec is not None:
            run = f"{self.spec.dataset}/{self.spec.model}  split={self.cfg.split}  weights={self.cfg.weights}"
        return {"workdir": str(self.cfg.workdir), "run": run, "trainer": trainer, "backlog": backlog,
                "warnings": warnings, "class_names": list(self.spec.class_names) if self.spec else [],
                "per_class": self.cfg.per_class}

    def _result_warnings(self) -> list[str]:
        """Warnings about what the ledger holds, and the one-off notes of this session."""
        rows = self.rows()
        warnings = []
        errors = [r.checkpoint for r in rows if r.status == "error"]
        if errors:
            warnings.append(f"{len(errors)} checkpoint(s) could not be read: {', '.join(errors[-3:])} "
                            "(reason in the status column)")
        failed = [r for r in rows if r.status == FAILED]
        if failed:
            warnings.append(f"{len(failed)} checkpoint(s) not evaluated because of a problem here, not in the "
                            f"checkpoint ({failed[-1].reason}); evaluated again at the next scan or run")
        if self.best_problem:
            warnings.append(self.best_problem)
        if self.ledger.skipped:
            warnings.append(f"skipped {self.ledger.skipped} unreadable line(s) of {self.ledger.path}")
        return warnings + self.notes


def _require_folder(workdir: Path) -> None:
    """Refuse a workdir that exists but is not a folder (a file given by mistake)."""
    if workdir.exists() and not workdir.is_dir():
        raise UsageError(f"--workdir {workdir}: this is a file, not a folder")


def _index_mtime(prefix: Path) -> float:
    try:
        return Path(f"{prefix}.index").stat().st_mtime
    except OSError:
        return 0.0


def trainer_status(workdir: Path, silent_secs: float) -> tuple[str, str]:
    """A line on the trainer (from done.json and heartbeat.json), and a warning if it went silent."""
    done = read_json(workdir / DONE_FILE)
    if done is not None:
        return f"finished at step {done.get('step')}", ""
    beat = read_json(workdir / HEARTBEAT_FILE)
    if beat is None:
        return "not seen yet", ""
    age = time.time() - float(beat.get("time", 0))
    step, total = beat.get("step"), beat.get("total_steps")
    if beat.get("state") == "stopped":
        return f"stopped (last step {step})", ""
    line = f"step {step}/{total}, {float(beat.get('steps_per_sec', 0)):.1f} steps/s, {age:.0f}s ago"
    return line, (f"trainer silent for {age:.0f}s" if age > silent_secs else "")


def run_once(cfg: EvalConfig) -> Session:
    """Evaluate everything pending (or the newest with --policy latest) and return the session.

    Raises:
      UsageError: no run.json, an unknown model, no checkpoint at all, or the workdir is a file.
      CheckpointError: the state file is unreadable.
      WorkdirIOError: the evaluator's files in the workdir cannot be written.
    """
    _require_folder(cfg.workdir)
    session = Session(cfg)
    session.prepare()
    listed = session.listed()
    if not listed:
        raise UsageError(f"{cfg.workdir}: no checkpoint to evaluate (no state file, or it lists none)")
    session.clean()
    try:
        todo = session.pending(listed)
        for cand in todo:
            if cand.on_disk:
                session.evaluate(cand)
        session.record_unread([c for c in todo if not c.on_disk])
        session.sync_best()
    finally:
        session.close()
    return session


def json_lines(session: Session) -> str:
    """The ledger's records for this split and these weights, one JSON object per line."""
    records = [r for r in session.ledger.read()
               if r.get("split") == session.cfg.split and r.get("weights") in session.weights]
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)


def run_watch(cfg: EvalConfig, display: Display, stop: StopRequest) -> None:
    """Evaluate every checkpoint the trainer commits until stopped (or done, with --exit-when-done)."""
    session = Session(cfg)
    wake = Wake()
    stop.on_set.append(wake.set)
    while not stop and not cfg.workdir.is_dir():
        _require_folder(cfg.workdir)
        display.update([], session.status(0) | {"state": f"waiting for {cfg.workdir} to appear"})
        wake.wait(0.5)
    if stop:
        return
    session.clean()
    with watching(cfg.workdir, wake, poll=cfg.poll, poll_secs=cfg.poll_secs), contextlib.closing(session):
        show = _Refresh(session, display, wake)
        show("watching", 0)
        while not stop:
            todo = _scan(session)
            if todo and not stop:
                show(f"evaluating {todo[0].name}", len(todo))
                if todo[0].on_disk:
                    session.evaluate(todo[0])
                else:  # the rest are names without files too (see Session.pending)
                    session.record_unread(todo)
                continue
            session.sync_best()
            if cfg.exit_when_done and session.problem == "" and (cfg.workdir / DONE_FILE).exists():
                show(_finished_state(session), 0)
                return
            show("waiting for the trainer" if session.problem else "watching", 0)
            if wake.wait(cfg.rescan_secs):
                wake.settle(SETTLE_QUIET_SECS, SETTLE_MAX_SECS)
            session.deferred.clear()  # a new scan cycle: retry what failed in the last one


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
    try:
        session.prepare()
        todo = session.pending(session.listed())
    except (ProjectError, CheckpointError) as e:
        session.problem = str(e)
        return []
    session.problem = ""
    return todo
