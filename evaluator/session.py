"""The evaluator's loops: `watch` (a daemon woken by filesystem events) and `once` (for scripts).

Both share `Session`: list the checkpoints the state file names, drop those the ledger already
holds, evaluate the rest oldest first (or only the newest), append the results to the ledger.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from common import checkpoints, models
from common.checkpoints import CheckpointError
from common.errors import ProjectError, UsageError
from common.fileio import atomic_write_json
from common.runconfig import RunSpec, read_run
from common.signals import StopRequest
from common.workdir import DONE_FILE, HEARTBEAT_FILE, STOP_REQUEST_FILE, TB_DIR, read_best, read_json
from evaluator.best import clean_stale, improves, promote
from evaluator.core import WEIGHT_CHOICES, CheckpointEvaluator
from evaluator.display import Display
from evaluator.ledger import Ledger, Record
from evaluator.rows import Row, build_rows, without_improvement
from evaluator.snapshot import lease
from evaluator.tensorboard import TensorBoardSink
from evaluator.watch import Wake, watching

SETTLE_QUIET_SECS = 0.02  # a save writes the state file once; wait this long for more events
SETTLE_MAX_SECS = 0.2


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
            if not getattr(self, name) > 0:
                raise UsageError(f"--{name.replace('_', '-')} ({getattr(self, name)}) must be positive")
        if self.patience < 0 or self.min_delta < 0:
            raise UsageError(f"--patience ({self.patience}) and --min-delta ({self.min_delta}) must not be negative")
        if self.patience and self.split != "validation":
            raise UsageError("--patience watches the validation split; drop --split test")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A checkpoint the state file lists."""

    name: str
    committed: float  # the state file's timestamp for it (index mtime when it has none)

    @property
    def step(self) -> int | None:
        return checkpoints.step_of(self.name)


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
        found = []
        for name in names:
            committed = state.timestamp_of(name) or _index_mtime(checkpoints.resolve(self.cfg.workdir, name))
            found.append(Candidate(name, committed))
        now = time.time()
        for cand in found:
            self.first_seen.setdefault(cand, now)
        return sorted(found, key=lambda c: (c.committed, c.step or 0))

    def pending(self, listed: list[Candidate]) -> list[Candidate]:
        """What is still to evaluate, in order, under the policy."""
        done = self.ledger.keys()
        todo = [c for c in listed
                if any((Path(c.name).name, c.committed, self.cfg.split, w) not in done for w in self.weights)]
        if self.cfg.policy == "latest":
            return [c for c in todo if listed and c == listed[-1]]
        return todo

    def evaluate(self, cand: Candidate) -> list[Record]:
        """Evaluate one checkpoint and record it; return the records added to the ledger."""
        core = self.prepare()
        with lease(self.cfg.workdir, Path(cand.name).name):
            records = core.evaluate(cand.name, committed=cand.committed,
                                    detected=self.first_seen.get(cand, time.time()), keep=self._keep_if_best)
        added = self.ledger.append(records)
        self.tensorboard.write(added)
        if self.cfg.patience:
            self._check_patience()
        return added

    def _keep_if_best(self, private: Path, records: list[Record]) -> None:
        """Promote the evaluated files to eval/best when they beat the best validation accuracy."""
        main = records[0]
        if main["split"] == "validation" and improves(main, read_best(self.cfg.workdir)):
            promote(self.cfg.workdir, private, main)

    def _check_patience(self) -> None:
        rows = self.rows()
        count, best = without_improvement(rows, min_delta=self.cfg.min_delta)
        if count < self.cfg.patience or best is None:
            return
        last = [r for r in rows if r.accuracy is not None][-1]
        reason = (f"no improvement of more than {self.cfg.min_delta:g} in {count} evaluations "
                  f"(best {100 * (best.accuracy or 0):.2f}% at step {best.step}, last step {last.step})")
        request = read_json(self.cfg.workdir / STOP_REQUEST_FILE)
        if request is None or request.get("step") != last.step:
            atomic_write_json(self.cfg.workdir / STOP_REQUEST_FILE,
                              {"step": last.step, "reason": reason, "time": time.time(), "pid": os.getpid()})
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
        errors = [r.checkpoint for r in self.rows() if r.status == "error"]
        if errors:
            warnings.append(f"{len(errors)} checkpoint(s) could not be read: {', '.join(errors[-3:])} "
                            "(reason in the status column)")
        run = ""
        if self.spec is not None:
            run = f"{self.spec.dataset}/{self.spec.model}  split={self.cfg.split}  weights={self.cfg.weights}"
        return {"workdir": str(self.cfg.workdir), "run": run, "trainer": trainer, "backlog": backlog,
                "warnings": warnings, "class_names": list(self.spec.class_names) if self.spec else [],
                "per_class": self.cfg.per_class}


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
      UsageError: no run.json, an unknown model, or no checkpoint at all.
      CheckpointError: the state file is unreadable.
    """
    session = Session(cfg)
    session.prepare()
    listed = session.listed()
    if not listed:
        raise UsageError(f"{cfg.workdir}: no checkpoint to evaluate (no state file, or it lists none)")
    clean_stale(cfg.workdir)
    try:
        for cand in session.pending(listed):
            session.evaluate(cand)
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
        display.update([], session.status(0) | {"state": f"waiting for {cfg.workdir} to appear"})
        wake.wait(0.5)
    if stop:
        return
    clean_stale(cfg.workdir)
    with watching(cfg.workdir, wake, poll=cfg.poll, poll_secs=cfg.poll_secs), contextlib.closing(session):
        display.update(session.rows(), session.status(0) | {"state": "watching"})
        while not stop:
            todo = _scan(session)
            if todo and not stop:
                display.update(session.rows(), session.status(len(todo)) | {"state": f"evaluating {todo[0].name}"})
                session.evaluate(todo[0])
                continue
            if cfg.exit_when_done and session.problem == "" and (cfg.workdir / DONE_FILE).exists():
                display.update(session.rows(), session.status(0) | {"state": "trainer finished; all evaluated"})
                return
            state = "waiting for the trainer" if session.problem else "watching"
            display.update(session.rows(), session.status(0) | {"state": state})
            if wake.wait(cfg.rescan_secs):
                wake.settle(SETTLE_QUIET_SECS, SETTLE_MAX_SECS)


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
