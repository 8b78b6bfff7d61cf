"""The evaluation core: a checkpoint path in, records out. It knows nothing of watching or display."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path

import tensorflow as tf

from common.checkpoint import checkpoints
from common.checkpoint.checkpoints import CheckpointError
from common.model.evaluation import Evaluation
from common.model.metrics import UserMetric
from common.run import loader
from common.run.ledger import FAILED, FINGERPRINT, Record
from common.run.protocol import LedgerRow
from common.run.spec import RunSpec
from common.run.workdir import Workdir
from common.storage import Gone
from evaluator.cluster import CANNOT_PIN, CANNOT_READ, NOT_THE_CHIEFS, Cluster, Order, PeerProblem, code, describe
from evaluator.sets import EvalSet

WEIGHT_CHOICES = {"ema": ("ema",), "raw": ("raw",), "both": ("ema", "raw")}


class SnapshotEvaluator:
    """Evaluate checkpoints of one workdir on one or more sets from private snapshots (the evaluation core's contract).

    Each weights kind of a snapshot is restored once and evaluated on every set asked for.
    Subclasses say how weights are restored (`_restore_weights`) and a set measured (`_measure`).
    """

    def __init__(self, workdir: Workdir, sets: tuple[EvalSet, ...], *, weights: str) -> None:
        if weights not in WEIGHT_CHOICES:
            raise ValueError(f"`weights` ({weights!r}) must be one of {sorted(WEIGHT_CHOICES)}")
        if not sets:
            raise ValueError("`sets` must name at least one evaluation set")
        self.workdir = workdir
        self.sets = sets
        self.weights = WEIGHT_CHOICES[weights]

    def before_pin(self, name: str) -> None:
        """Called before checkpoint `name` is pinned (a TF1 Saver's core waits for its `.meta` there)."""

    def evaluate_snapshot(self, private: Path, base: Record, sets: Sequence[str] | None = None) -> list[LedgerRow]:
        """Evaluate a pinned private copy of the checkpoint `base` names on `sets` (all when None).

        One record per set and weights kind. The caller pins, records and releases
        (`evaluator.session.Session.evaluate`). Never raises for a bad checkpoint: an unreadable one
        (truncated, corrupt, missing EMA shadows) gives `status: error` with the reason, naming the
        checkpoint rather than the private copy.
        """
        chosen = self.chosen(sets)
        try:
            results = [r for kind in self.weights for r in self._evaluate_weights(private, kind, chosen)]
        except CheckpointError as e:
            # Named where it lies (a bucket's URL), never by the private copy that was read.
            return self.failed(base, "error", str(e).replace(str(private), self.workdir.describe(base["checkpoint"])),
                               sets)
        finished = time.time()
        return [LedgerRow(base | r | {"status": "ok", "finished": finished, "eval_secs": finished - base["started"]})
                for r in results]

    def chosen(self, names: Sequence[str] | None) -> tuple[EvalSet, ...]:
        """The sets called `names`, in the configured order (all when None)."""
        return self.sets if names is None else tuple(s for s in self.sets if s.name in names)

    def _evaluate_weights(self, prefix: Path, kind: str, sets: tuple[EvalSet, ...]) -> list[Record]:
        """Restore weights `kind` of `prefix` once, then measure each set; CheckpointError when it cannot be used."""
        step = self._restore_weights(prefix, kind)
        records = []
        for eval_set in sets:
            started = time.monotonic()
            metrics = self._measure(eval_set)
            records.append(eval_set.fields | {"weights": kind, "step": step, **metrics,
                                              "set_secs": time.monotonic() - started})
        return records

    def unread(self, name: str, *, committed: float, detected: float, sets: Sequence[str] | None = None
               ) -> list[LedgerRow]:
        """Records for a listed checkpoint that is not there to read: `gone`, or `error` if it lies outside.

        Costs no snapshot, so a state file listing thousands of missing checkpoints is recorded at once.
        """
        base = self.begin(name, committed=committed, detected=detected, fingerprint=None)
        if not self.workdir.inside(name):
            return self.failed(base, "error", f"refused: the state file's path {name!r} points outside the workdir",
                               sets)
        return self.failed(base, "gone", f"{base['checkpoint']}.index is gone", sets)

    def begin(self, name: str, *, committed: float, detected: float, fingerprint: str | None) -> Record:
        """The fields every record of checkpoint `name` carries, whatever its set; its `started` time is now."""
        return {"checkpoint": Path(name).name, "step": checkpoints.saver_step(name),
                "committed": committed, "detected": detected, "started": time.time(), FINGERPRINT: fingerprint}

    def close(self) -> None:
        """Free what the evaluator holds (a session, a graph)."""

    def _restore_weights(self, prefix: Path, kind: str) -> int | None:
        """Restore weights `kind` of snapshot `prefix`; return its step. CheckpointError when it cannot be used."""
        raise NotImplementedError

    def _measure(self, eval_set: EvalSet) -> Record:
        """The metrics of the restored weights on `eval_set`."""
        raise NotImplementedError

    def failed(self, base: Record, status: str, reason: str, sets: Sequence[str] | None = None) -> list[LedgerRow]:
        """Records of an evaluation that gave no figures: `status` (gone, error, failed) and why, per set, weights."""
        finished = time.time()
        return [LedgerRow(base | s.fields | {"weights": kind, "status": status, "reason": reason,
                                             "finished": finished, "eval_secs": finished - base["started"]})
                for kind in self.weights for s in self.chosen(sets)]


class CheckpointEvaluator(SnapshotEvaluator):
    """Evaluate checkpoints of one of this project's runs: its model, built from run.json.

    Under a `cluster` of several processes (`--strategy multi-worker`) the chief's core tells the
    workers each checkpoint it evaluates, and a worker's core takes part (`take_part`): then every
    set is evaluated each time (the ledger keeps the rows it does not hold yet), so that all
    processes run the same collectives.
    """

    def __init__(self, workdir: Workdir, spec: RunSpec, sets: tuple[EvalSet, ...], *, weights: str,
                 cluster: Cluster | None = None, top_k: int = 0, metrics: tuple[UserMetric, ...] = ()) -> None:
        super().__init__(workdir, sets, weights=weights)
        self.spec = spec
        self.cluster = cluster or Cluster(tf.distribute.get_strategy())
        for eval_set in sets:
            self.cluster.same_data(eval_set.fingerprint, len(eval_set.split))
        with self.cluster.strategy.scope():  # mirrored variables, which the restores fill on every replica
            self.model = loader.build_model(spec)
        self.evaluate_model = Evaluation(self.model, spec.prepare, strategy=self.cluster.strategy, top_k=top_k,
                                         metrics=metrics)

    def evaluate_snapshot(self, private: Path, base: Record, sets: Sequence[str] | None = None) -> list[LedgerRow]:
        """See `SnapshotEvaluator.evaluate_snapshot`; a worker that cannot take part makes the records `failed`."""
        step = checkpoints.step_of(private)
        if self.cluster.together:
            if step is None:
                return self.failed(base, "error", f"{base['checkpoint']}: evaluators on several workers read "
                                                  f"only checkpoints named {checkpoints.PREFIX}-<step>")
            self.cluster.tell(step, base[FINGERPRINT])
            sets = None  # the workers evaluate every set
        try:
            return super().evaluate_snapshot(private, base, sets)
        except PeerProblem as e:
            return self.failed(base, FAILED, str(e))

    def _restore_weights(self, prefix: Path, kind: str) -> int | None:
        try:
            loader.restore(self.model, prefix, kind)
        except CheckpointError:
            self.cluster.agree(CANNOT_READ)  # the workers skip it too
            raise
        others = self.cluster.agree(0)
        if others:
            raise PeerProblem(describe(others, prefix.name))
        return checkpoints.read_step(prefix)

    def _measure(self, eval_set: EvalSet) -> Record:
        return self.evaluate_model(eval_set.split)

    def take_part(self, order: Order) -> None:
        """A worker's side of the chief's `evaluate_snapshot`: pin the same checkpoint, restore it, evaluate along."""
        assert order.step is not None
        with contextlib.ExitStack() as pinned:
            private: Path | None = None
            try:
                private = pinned.enter_context(self.workdir.pin(checkpoints.name_for(order.step)))
            except (Gone, OSError):
                problem = CANNOT_PIN
            else:
                same = code(checkpoints.file_fingerprint(private)) == order.fingerprint
                problem = 0 if same else NOT_THE_CHIEFS
            for kind in self.weights:
                if private is not None and not problem:
                    problem = self._restore(private, kind)
                if self.cluster.agree(problem):
                    return
                for eval_set in self.sets:
                    self.evaluate_model(eval_set.split)

    def _restore(self, prefix: Path, kind: str) -> int:
        """Restore weights `kind` of `prefix`: 0, or CANNOT_READ."""
        try:
            loader.restore(self.model, prefix, kind)
        except CheckpointError:
            return CANNOT_READ
        return 0
