"""`Session`: one evaluator run's state, shared by the `watch` and `once` loops (evaluator.loop).

List the checkpoints the state file names, drop those the ledger already holds (matched by name
and `.index` content), evaluate the rest oldest first (or only the newest), append the results to
the ledger, then keep the best (evaluator.best) and watch patience (evaluator.early_stop). Listed
names without files are recorded in one batch at the end.

Several evaluators may share a workdir: each checkpoint is evaluated by the one that claims it
(`claimed`), and every row names its evaluator. A claim is a lock that dies with its holder (a
flock locally; an expiring object, renewed while held, in a bucket), so a killed evaluator's
checkpoint is taken over by another; the ledger, read again once the claim is held, tells whether
the work is done already.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Set
from pathlib import Path
from typing import Any

from common.checkpoint import checkpoints
from common.errors import DataNotFoundError, UsageError, WorkdirIOError
from common.layout import CLAIMS_DIR, EVAL_DIR, EVALUATOR_LEASE, TB_DIR
from common.model import registry
from common.model.metrics import UserMetric, load_metrics
from common.run.ledger import FAILED, FINGERPRINT, Ledger, candidate_keys, record_key
from common.run.protocol import LedgerRow
from common.run.spec import RunSpec, read_run
from common.run.workdir import Workdir
from common.storage import Gone, Locked, Stat, Storage
from common.storage.mirror import MirroredFolder
from evaluator import foreign, tf1core
from evaluator.best import BestKeeper, clean_stale
from evaluator.cluster import Cluster
from evaluator.config import EvalConfig
from evaluator.core import WEIGHT_CHOICES, CheckpointEvaluator, SnapshotEvaluator
from evaluator.early_stop import check_patience
from evaluator.rows import Row, build_rows
from evaluator.sets import EvalSet, Selection, SetError, SetNotFound, check_reused, load_named_set
from evaluator.snapshot import lease
from evaluator.status import header, result_warnings
from evaluator.tensorboard import TensorBoardSink

MAX_NOTES = 5  # one-off warnings kept in the header
# In a bucket, an idle evaluator's registration costs two requests per renewal, every third of this. One
# left by a dead evaluator of another host only makes the trainer keep --keep-pending checkpoints longer.
REGISTRATION_TTL_SECS = 600.0


def _native(session: Session) -> SnapshotEvaluator:
    """This project's runs: the model run.json names, the data it was trained on, and --eval-data's sets."""
    cfg, workdir = session.cfg, session.workdir
    spec = read_run(workdir.storage)
    if spec is None:
        tf1core.check_kind(workdir, tf1=False)
        raise UsageError(f"{workdir}: no run.json (not a trainer workdir, or no trainer started yet)")
    if not registry.is_known(spec.model):
        raise UsageError(f"{workdir}/run.json: unknown model {spec.model!r}")
    loaded = spec.load_data(cfg.data_dir)
    warnings = list(loaded.warnings)
    sets = [EvalSet(name, loaded.data.split(name)) for name in cfg.splits]
    with _flag_errors():
        for name, reference in cfg.eval_data:
            named, skipped = load_named_set(name, reference, spec)
            sets.append(named)
            warnings += skipped
        check_reused(sets, session.ledger.read())
        metrics = _metrics(cfg, sets[0], spec.num_classes)
    for text in warnings:
        session.note(text)
    session.data_warnings = warnings
    session.spec = spec
    return CheckpointEvaluator(workdir, spec, tuple(sets), weights=cfg.weights, cluster=session.cluster,
                               top_k=cfg.top_k, metrics=metrics)


@contextlib.contextmanager
def _flag_errors() -> Iterator[None]:
    """Turn what the sets' and metrics' flags get wrong into errors no later state of the workdir mends (SET_ERRORS)."""
    try:
        yield
    except DataNotFoundError as e:
        raise SetNotFound(str(e)) from None
    except UsageError as e:
        raise SetError(str(e)) from None


def _metrics(cfg: EvalConfig, first: EvalSet, num_classes: int) -> tuple[UserMetric, ...]:
    """--metric's functions, each checked against its contract on a few labels; --top-k checked against the classes."""
    if cfg.top_k >= num_classes:
        raise UsageError(f"--top-k ({cfg.top_k}) must be below the model's {num_classes} classes")
    metrics = load_metrics(cfg.metrics)
    for metric in metrics:
        metric.check(first.split.labels, num_classes)
    return metrics


def _tf1_graph(session: Session) -> SnapshotEvaluator:
    """A TF1 `tf.train.Saver` run, evaluated through its own meta graph (--tf1-graph)."""
    cfg = session.cfg
    assert cfg.graph is not None
    return tf1core.prepare(session.workdir, cfg.graph, splits=cfg.splits, weights=cfg.weights,
                           data_dir=cfg.data_dir)


def _other_loop(session: Session) -> SnapshotEvaluator:
    """Another TF2 loop's checkpoints, read into a model the flags name through key maps (--model)."""
    cfg = session.cfg
    assert cfg.foreign is not None
    newest = tf1core.check_kind(session.workdir, tf1=False)
    with _flag_errors():
        metrics = load_metrics(cfg.metrics)
    core = foreign.prepare(session.workdir, cfg.foreign, splits=cfg.splits, weights=cfg.weights,
                           data_dir=cfg.data_dir, newest=newest, strategy=session.cluster.strategy,
                           top_k=cfg.top_k, metrics=metrics)
    with _flag_errors():
        _metrics(cfg, core.sets[0], core.model.num_classes)
    return core


# The kinds of evaluation core, by the name `EvalConfig.kind` gives.
KINDS: dict[str, Callable[[Session], SnapshotEvaluator]] = {
    "native": _native, "tf1-graph": _tf1_graph, "other-loop": _other_loop,
}


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

    def __init__(self, cfg: EvalConfig, workdir: Workdir | None = None, *, cluster: Cluster | None = None) -> None:
        """`cluster`: the strategy to evaluate under, made from `cfg` when not given (the CLI makes it first)."""
        self.cfg = cfg
        self.workdir = workdir if workdir is not None else Workdir.open(cfg.workdir)
        self.cluster = cluster or Cluster.make(cfg.strategy, cfg.devices)
        self.ledger = Ledger(self.workdir.storage)
        self.weights = WEIGHT_CHOICES[cfg.weights]
        self.core: SnapshotEvaluator | None = None
        self.spec: RunSpec | None = None
        self.first_seen: dict[Candidate, float] = {}
        self.problem = ""  # the current setup or state-file problem, shown until it clears
        local = self.workdir.local_folder()
        if local is None:  # TF cannot write to a bucket here: a local folder, copied into it (common.storage.mirror)
            mirror = MirroredFolder(self.workdir.storage, f"{TB_DIR}/eval")
            self.tensorboard = TensorBoardSink(mirror.path, mirror)
        else:
            self.tensorboard = TensorBoardSink(local / TB_DIR / "eval")
        self.stop_requested = ""  # the reason of the stop request this session wrote, if any
        self.notes: list[str] = []  # one-off warnings (refused deletes, lost events), newest last
        self.unsent: list[str] = []  # notes the watch loop has not printed yet
        self.data_warnings: list[str] = []  # about where the data came from (RunSpec.load_data)
        self.best = BestKeeper(self.workdir, weights=self.weights[0], selection=cfg.selection or Selection(),
                               warn=self.note)
        self.deferred: set[Candidate] = set()  # failed in this scan cycle: retried in the next one
        self.elsewhere: dict[Candidate, str] = {}  # pending, claimed by another evaluator (its name) at the last try
        self.mine: set[tuple[Any, ...]] = set()  # record keys of the rows this session evaluated itself
        self.last_listed: list[Candidate] = []  # the checkpoints the state file listed at the last scan
        self.started = time.time()  # checkpoints committed since get every set (see `needed`)
        self._fingerprints: dict[str, tuple[str, str | None]] = {}  # name -> (Stat.token, fingerprint)

    def prepare(self) -> SnapshotEvaluator:
        """Make the evaluation core of the configured kind (`KINDS`) once: its model and split."""
        if self.core is None:
            self.core = KINDS[self.cfg.kind](self)
        return self.core

    def listed(self) -> list[Candidate]:
        """The checkpoints the state file lists, in commit order. Raises CheckpointError if unreadable."""
        state = self.workdir.state()
        if state is None:
            return []
        names = list(state.paths) if state.latest in state.paths else [*state.paths, state.latest or ""]
        stamps = state.timestamps_by_path()
        found = []
        for name in names:
            key = Path(name).name
            stat = self._index_stat(key) if self.workdir.inside(name) else None
            fingerprint = self._fingerprint(key, stat) if stat is not None else None
            found.append(Candidate(name, stamps.get(name) or (stat.mtime if stat else 0.0), fingerprint))
        now = time.time()
        for cand in found:
            self.first_seen.setdefault(cand, now)
        self.last_listed = sorted(found, key=lambda c: (c.committed, c.step or 0))
        return self.last_listed

    def _index_stat(self, name: str) -> Stat | None:
        """The Stat of checkpoint `name`'s `.index` (one request in a bucket), or None when it is not there."""
        try:
            return self.workdir.storage.stat(f"{name}.index")
        except OSError:
            return None

    def _fingerprint(self, name: str, stat: Stat) -> str | None:
        """The .index fingerprint of checkpoint `name`, read again only when the file changed (its `Stat.token`)."""
        cached = self._fingerprints.get(name)
        if cached is None or cached[0] != stat.token:
            cached = self._fingerprints[name] = (stat.token, self.workdir.fingerprint(name))
        return cached[1]

    @contextlib.contextmanager
    def register(self) -> Iterator[None]:
        """Say that an evaluator evaluates every commit, while the block runs (the trainer's --keep-pending reads it).

        Not with --policy latest, which evaluates only the newest. A registration that cannot be
        written (read-only workdir, full disk) is a note: reading a workdir needs none.
        """
        with contextlib.ExitStack() as held:
            if self.cfg.policy == "all":
                try:
                    held.enter_context(lease(self.workdir.storage, EVALUATOR_LEASE, ttl=REGISTRATION_TTL_SECS))
                except WorkdirIOError as e:
                    self.note(f"{e}: the trainer's --keep-pending does not see this evaluator")
            yield

    def pending(self, listed: list[Candidate]) -> list[Candidate]:
        """What is still to evaluate under the policy: checkpoints on disk first, in commit order.

        Listed names without files (deleted, or junk in an edited state file) come last and are
        recorded in one batch (`record_unread`), so they never hold up a real checkpoint.
        """
        done = self.ledger.keys()  # read once: in a bucket each read is a request
        todo = [c for c in listed if c not in self.deferred and self.needed(c, done)]
        if self.cfg.policy == "latest":
            todo = [c for c in todo if listed and c == listed[-1]]
        return sorted(todo, key=lambda c: not c.on_disk)

    def needed(self, cand: Candidate, done: Set[tuple[Any, ...]] | None = None) -> tuple[str, ...]:
        """The sets `cand` is still to be evaluated on (`done`: the ledger's keys, read again when not given).

        New sets are added for new checkpoints: one committed before this evaluator started, whose
        deciding set (or, when none decides, some set) is recorded already, gets the sets an earlier
        evaluator left out only with --backfill. One committed since gets every set it lacks, even
        when a concurrent evaluator of fewer sets recorded the deciding one first.
        """
        done = self.ledger.keys() if done is None else done
        name = Path(cand.name).name
        missing = tuple(s for s in self.cfg.set_names if not all(
            any(k in done for k in candidate_keys(name, fingerprint=cand.fingerprint, committed=cand.committed,
                                                  split=s, weights=w)) for w in self.weights))
        decides = self.cfg.selection.set if self.cfg.selection is not None else None
        new = self.cfg.backfill or cand.committed >= self.started or len(missing) == len(self.cfg.set_names)
        return missing if new or decides in missing else ()

    @contextlib.contextmanager
    def claim(self, cand: Candidate) -> Iterator[bool]:
        """Hold the claim on `cand` while the block runs; yield whether to evaluate it here.

        False when another evaluator holds the claim (`cand` is kept in `elsewhere`, with who holds
        it) or finished it before this one got the claim (the ledger is read again once it is held).

        Raises:
          WorkdirIOError: the claim cannot be written (read-only workdir, full disk).
        """
        key = f"{EVAL_DIR}/{CLAIMS_DIR}/{Path(cand.name).name}"
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(_claim_lock(self.workdir.storage, key, self.cfg.name))
            except Locked as holder:
                self.elsewhere[cand] = str(holder)
                yield False
                return
            self.elsewhere.pop(cand, None)
            yield bool(self.needed(cand))

    def evaluate(self, cand: Candidate) -> list[LedgerRow]:
        """Evaluate one checkpoint (claimed: see `claim`) and record it; return the records added to the ledger.

        The session holds what it takes, in order: a lease, then a pinned private copy, which the
        core evaluates; the records go to the ledger, then the copy is offered to eval/best, then
        both are released. A checkpoint deleted while being pinned is `gone`; a snapshot this
        machine cannot make (full disk, no permission) is `failed` and retried in the next cycle.

        Raises:
          WorkdirIOError: the lease or the ledger cannot be written.
        """
        core = self.prepare()
        name = Path(cand.name).name
        sets = self.needed(cand)
        if not sets:  # recorded meanwhile (`claim` read the ledger before this did)
            return []
        base = core.begin(cand.name, committed=cand.committed, fingerprint=cand.fingerprint,
                          detected=self.first_seen.get(cand, time.time()))
        if not self.workdir.inside(cand.name):
            return self._after(self._append(core.unread(cand.name, committed=cand.committed,
                                                        detected=base["detected"], sets=sets)))
        core.before_pin(cand.name)
        with lease(self.workdir.storage, name), contextlib.ExitStack() as pinned:
            try:
                private = pinned.enter_context(self.workdir.pin(name))
            except Gone as e:
                records = core.failed(base | {FINGERPRINT: None}, "gone", str(e), sets)
            except OSError as e:
                records = core.failed(base, FAILED, f"cannot snapshot {name}: {e.strerror or e}", sets)
            else:
                base[FINGERPRINT] = checkpoints.file_fingerprint(private)
                records = core.evaluate_snapshot(private, base, sets)
                # The ledger first: a failed append must not leave best.json naming an unrecorded checkpoint.
                added = self._append(records)
                deciding = self._deciding(records)
                if deciding is not None:
                    self.best.offer(private, deciding)
                if records[0].status == FAILED:  # another evaluator process could not take part
                    self.deferred.add(cand)
                return self._after(added)
        if records[0].status == FAILED:
            self.deferred.add(cand)
        return self._after(self._append(records))

    def _deciding(self, records: list[LedgerRow]) -> LedgerRow | None:
        """The record that ranks the checkpoint for eval/best: the selected set's, of the primary weights."""
        selection = self.cfg.selection
        if selection is None:
            return None
        return next((r for r in self._signed(records) if r.split == selection.set and r.weights == self.weights[0]),
                    None)

    def _signed(self, rows: list[LedgerRow]) -> list[LedgerRow]:
        """`rows`, each naming this evaluator."""
        return [LedgerRow(dict(r.fields) | {"evaluator": self.cfg.name}) for r in rows]

    def _append(self, rows: list[LedgerRow]) -> list[LedgerRow]:
        """Append `rows`, signed, to the ledger; remember them as this session's own work."""
        added = self.ledger.append(self._signed(rows))
        self.mine.update(record_key(r.fields) for r in added if r.status != FAILED)
        return added

    def record_unread(self, cands: list[Candidate]) -> list[LedgerRow]:
        """Record listed checkpoints whose files are not there (`gone`, or `error` outside the workdir) at once."""
        if not cands:
            return []
        core = self.prepare()
        done = self.ledger.keys()
        records = [r for c in cands for r in core.unread(c.name, committed=c.committed, sets=self.needed(c, done),
                                                         detected=self.first_seen.get(c, time.time()))]
        return self._after(self._append(records))

    def _after(self, added: list[LedgerRow]) -> list[LedgerRow]:
        """Hand what was added to TensorBoard, then check patience (which reads the ledger again)."""
        self.tensorboard.write(added)
        if self.cfg.patience and self.best.mismatch:
            self.note(f"--patience is paused: {self.best.mismatch}")
        elif self.cfg.patience:
            assert self.cfg.selection is not None  # EvalConfig refuses --patience without one
            reason = check_patience(self.workdir.storage, self._settled_rows(), selection=self.cfg.selection,
                                    patience=self.cfg.patience,
                                    min_delta=self.cfg.min_delta)
            self.stop_requested = reason or self.stop_requested
            if reason and (self.cfg.graph is not None or self.cfg.foreign is not None):
                self.note("stop_request.json is written, but a trainer other than this project's does not read "
                          "it: stop that trainer yourself")
        return added

    def _settled_rows(self) -> list[Row]:
        """The rows up to the first listed checkpoint not recorded yet (another evaluator may still be on it).

        Several evaluators finish out of commit order; patience counts a checkpoint only once every
        earlier one is in, so a later result never counts before an earlier one that might improve.
        """
        done = self.ledger.keys()
        open_steps = [c.step for c in self.last_listed if c.on_disk and c.step is not None
                      and c not in self.deferred and self.needed(c, done)]
        rows = self.rows()
        return rows if not open_steps else [r for r in rows if r.step is not None and r.step < min(open_steps)]

    def sync_best(self) -> None:
        """Retry a promotion that failed or was cut short (when a set decides: see `EvalConfig.selection`)."""
        if self.cfg.selection is not None:
            self.best.sync(self.ledger.read())

    def note(self, message: str) -> None:
        """Keep a one-off warning for the header, and for the watch loop to print once."""
        if message not in self.notes:
            self.notes = [*self.notes, message][-MAX_NOTES:]
            self.unsent.append(message)

    def clean(self) -> None:
        """Remove what earlier evaluators left behind (see evaluator.best.clean_stale), and claims no one holds."""
        clean_stale(self.workdir, warn=self.note)
        storage = self.workdir.storage
        for name in storage.names(f"{EVAL_DIR}/{CLAIMS_DIR}"):
            # A killed evaluator's claim is free; taking it with `discard` removes it. A live one's is Locked.
            with contextlib.suppress(Locked, WorkdirIOError), \
                    _claim_lock(storage, f"{EVAL_DIR}/{CLAIMS_DIR}/{name}", self.cfg.name):
                pass

    def close(self) -> None:
        self.tensorboard.close()
        if self.core is not None:
            self.core.close()

    def rows(self) -> list[Row]:
        return build_rows(self.ledger.read(), sets=self.cfg.set_names, selection=self.cfg.selection,
                          weights=self.weights, mine=self.mine)

    def status(self, backlog: int) -> dict[str, Any]:
        """The header: workdir, run, trainer status, backlog and warnings."""
        warnings = [f"asked the trainer to stop: {self.stop_requested}"] if self.stop_requested else []
        warnings += result_warnings(self.rows(), self.ledger, best_problem=self.best.problem)
        return header(self.cfg, self.workdir.storage, self.spec, backlog, problem=self.problem,
                      warnings=warnings + self.notes)




@contextlib.contextmanager
def _claim_lock(storage: Storage, key: str, name: str) -> Iterator[None]:
    """Claim lock `key`, taken without waiting (Locked when held) and removed on release (see `Storage.lock`).

    Raises:
      WorkdirIOError: the claim cannot be written (read-only workdir, full disk).
    """
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(storage.lock(key, wait=False, note=name, discard=True))
        except OSError as e:
            raise WorkdirIOError(f"cannot write the claim {storage.describe(key)}: {e.strerror or e}") from e
        yield
