"""`Session`: one evaluator run's state, shared by the `watch` and `once` loops (evaluator.loop).

List the checkpoints the state file names, drop those the ledger already holds (matched by name
and `.index` content), evaluate the rest oldest first (or only the newest), append the results to
the ledger, then keep the best (evaluator.best) and watch patience (evaluator.early_stop). Listed
names without files are recorded in one batch at the end.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from common.checkpoint import checkpoints
from common.errors import UsageError
from common.layout import TB_DIR
from common.model import registry
from common.run.spec import RunSpec, read_run
from common.storage import Storage, open_storage
from common.storage.paths import BucketPath, Workdir
from evaluator import foreign, tf1core
from evaluator.best import BestKeeper, clean_stale
from evaluator.config import EvalConfig
from evaluator.core import WEIGHT_CHOICES, CheckpointEvaluator, SnapshotEvaluator
from evaluator.early_stop import check_patience
from evaluator.ledger import FAILED, Ledger, Record, candidate_keys
from evaluator.rows import Row, build_rows
from evaluator.snapshot import lease
from evaluator.status import header, result_warnings
from evaluator.tensorboard import TensorBoardSink

MAX_NOTES = 5  # one-off warnings kept in the header


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A checkpoint the state file lists."""

    name: str
    committed: float  # the state file's timestamp for it (index mtime when it has none)
    fingerprint: str | None = None  # of its .index file (checkpoints.index_fingerprint); None: not there

    @property
    def step(self) -> int | None:
        return checkpoints.saver_step(self.name)

    @property
    def on_disk(self) -> bool:
        """Whether its files were there when listed (else it is recorded without a snapshot)."""
        return self.fingerprint is not None


class Session:
    """State shared by one evaluator run: its config, ledger and (once ready) evaluation core."""

    def __init__(self, cfg: EvalConfig) -> None:
        self.cfg = cfg
        self.ledger = Ledger(cfg.workdir)
        self.storage = open_storage(cfg.workdir)
        self.weights = WEIGHT_CHOICES[cfg.weights]
        self.core: SnapshotEvaluator | None = None
        self.spec: RunSpec | None = None
        self.first_seen: dict[Candidate, float] = {}
        self.problem = ""  # the current setup or state-file problem, shown until it clears
        bucket = isinstance(cfg.workdir, BucketPath)  # TF cannot write TensorBoard logs to S3 or an emulator
        self.tensorboard = TensorBoardSink(None if bucket else Path(cfg.workdir) / TB_DIR / "eval")
        self.stop_requested = ""  # the reason of the stop request this session wrote, if any
        self.notes: list[str] = []  # one-off warnings (refused deletes, lost events), newest last
        self.unsent: list[str] = []  # notes the watch loop has not printed yet
        self.data_warnings: list[str] = []  # about where the data came from (RunSpec.load_data)
        self.best = BestKeeper(cfg.workdir, weights=self.weights[0], warn=self.note)
        self.deferred: set[Candidate] = set()  # failed in this scan cycle: retried in the next one
        self._fingerprints: dict[Workdir, tuple[str, str | None]] = {}  # prefix -> (Stat.token, fingerprint)
        if bucket:
            self.note("TensorBoard logs are not written for a bucket workdir")

    def prepare(self) -> SnapshotEvaluator:
        """Build the model from run.json (or import a TF1 Saver's graph, with --tf1-graph) and load the split (once)."""
        if self.core is None and self.cfg.graph is not None:
            self.core = tf1core.prepare(self.cfg.workdir, self.cfg.graph, split_name=self.cfg.split,
                                        weights=self.cfg.weights, data_dir=self.cfg.data_dir)
        if self.core is None and self.cfg.foreign is not None:
            newest = tf1core.check_kind(self.cfg.workdir, tf1=False)
            self.core = foreign.prepare(self.cfg.workdir, self.cfg.foreign, split_name=self.cfg.split,
                                        weights=self.cfg.weights, data_dir=self.cfg.data_dir, newest=newest)
        if self.core is None:
            spec = read_run(self.cfg.workdir)
            if spec is None:
                tf1core.check_kind(self.cfg.workdir, tf1=False)
                raise UsageError(f"{self.cfg.workdir}: no run.json (not a trainer workdir, or no trainer started yet)")
            if not registry.is_known(spec.model):
                raise UsageError(f"{self.cfg.workdir}/run.json: unknown model {spec.model!r}")
            loaded = spec.load_data(self.cfg.data_dir)
            for text in loaded.warnings:
                self.note(text)
            self.data_warnings = list(loaded.warnings)
            self.core = CheckpointEvaluator(self.cfg.workdir, spec, loaded.data.split(self.cfg.split),
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
            fingerprint = self._fingerprint(name, prefix) if checkpoints.inside(self.cfg.workdir, name) else None
            found.append(Candidate(name, stamps.get(name) or _index_mtime(self.storage, prefix), fingerprint))
        now = time.time()
        for cand in found:
            self.first_seen.setdefault(cand, now)
        return sorted(found, key=lambda c: (c.committed, c.step or 0))

    def _fingerprint(self, name: str, prefix: Workdir) -> str | None:
        """The .index fingerprint, read again only when the file changed (its `Stat.token`)."""
        try:
            stat = self.storage.stat(f"{Path(name).name}.index")
        except OSError:
            return None
        if stat is None:
            return None
        stamp = stat.token
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
            self.best.offer(private, records[0])

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
        """Hand what was added to TensorBoard, then check patience (which reads the ledger again)."""
        self.tensorboard.write(added)
        if self.cfg.patience:
            reason = check_patience(self.cfg.workdir, self.rows(), patience=self.cfg.patience,
                                    min_delta=self.cfg.min_delta)
            self.stop_requested = reason or self.stop_requested
            if reason and (self.cfg.graph is not None or self.cfg.foreign is not None):
                self.note("stop_request.json is written, but a trainer other than this project's does not read "
                          "it: stop that trainer yourself")
        return added

    def sync_best(self) -> None:
        """Retry a promotion that failed or was cut short (validation only: best is a validation result)."""
        if self.cfg.split == "validation":
            self.best.sync(self.ledger.read())

    def note(self, message: str) -> None:
        """Keep a one-off warning for the header, and for the watch loop to print once."""
        if message not in self.notes:
            self.notes = [*self.notes, message][-MAX_NOTES:]
            self.unsent.append(message)

    def clean(self) -> None:
        """Remove what earlier evaluators left behind (see evaluator.best.clean_stale)."""
        clean_stale(self.cfg.workdir, warn=self.note)

    def close(self) -> None:
        self.tensorboard.close()
        if self.core is not None:
            self.core.close()

    def rows(self) -> list[Row]:
        return build_rows(self.ledger.read(), split=self.cfg.split, weights=self.weights)

    def status(self, backlog: int) -> dict[str, Any]:
        """The header: workdir, run, trainer status, backlog and warnings."""
        warnings = [f"asked the trainer to stop: {self.stop_requested}"] if self.stop_requested else []
        warnings += result_warnings(self.rows(), self.ledger, best_problem=self.best.problem)
        return header(self.cfg, self.spec, backlog, problem=self.problem, warnings=warnings + self.notes)


def _index_mtime(storage: Storage, prefix: Workdir) -> float:
    try:
        if isinstance(prefix, BucketPath):
            stat = storage.stat(f"{prefix.name}.index")
            return stat.mtime if stat else 0.0
        return Path(f"{prefix}.index").stat().st_mtime
    except OSError:
        return 0.0
