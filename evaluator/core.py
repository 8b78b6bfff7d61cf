"""The evaluation core: a checkpoint path in, records out. It knows nothing of watching or display."""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from common.checkpoint import checkpoints
from common.checkpoint.checkpoints import CheckpointError
from common.data import datasets
from common.model.evaluation import Evaluation
from common.run import loader
from common.run.ledger import FAILED, FINGERPRINT, Record
from common.run.protocol import LedgerRow
from common.run.spec import RunSpec
from common.run.workdir import Workdir
from common.storage import Gone
from evaluator.cluster import CANNOT_PIN, CANNOT_READ, NOT_THE_CHIEFS, Cluster, Order, PeerProblem, code, describe

WEIGHT_CHOICES = {"ema": ("ema",), "raw": ("raw",), "both": ("ema", "raw")}


def fingerprint(split: datasets.Split) -> str:
    """A short hash of a split's images and labels, so results on different data never mix silently."""
    digest = hashlib.sha256(datasets.content(split.images))
    digest.update(np.ascontiguousarray(split.labels).tobytes())
    return digest.hexdigest()[:16]


class SnapshotEvaluator:
    """Evaluate checkpoints of one workdir on one split from private snapshots (the evaluation core's contract).

    Subclasses say how one kind of weights of a snapshot is evaluated (`_evaluate_weights`).
    """

    def __init__(self, workdir: Workdir, split: datasets.Split, *, split_name: str, weights: str) -> None:
        if weights not in WEIGHT_CHOICES:
            raise ValueError(f"`weights` ({weights!r}) must be one of {sorted(WEIGHT_CHOICES)}")
        self.workdir = workdir
        self.split = split
        self.split_name = split_name
        self.weights = WEIGHT_CHOICES[weights]
        self.data_fingerprint = fingerprint(split)

    def before_pin(self, name: str) -> None:
        """Called before checkpoint `name` is pinned (a TF1 Saver's core waits for its `.meta` there)."""

    def evaluate_snapshot(self, private: Path, base: Record) -> list[LedgerRow]:
        """Evaluate a pinned private copy of the checkpoint `base` names; one record per weights kind.

        The caller pins, records and releases (`evaluator.session.Session.evaluate`). Never raises for a
        bad checkpoint: an unreadable one (truncated, corrupt, missing EMA shadows) gives `status: error`
        with the reason, naming the checkpoint rather than the private copy.
        """
        try:
            results = [self._evaluate_weights(private, kind) for kind in self.weights]
        except CheckpointError as e:
            # Named where it lies (a bucket's URL), never by the private copy that was read.
            return self.failed(base, "error", str(e).replace(str(private), self.workdir.describe(base["checkpoint"])))
        finished = time.time()
        return [LedgerRow(base | r | {"status": "ok", "finished": finished, "eval_secs": finished - base["started"]})
                for r in results]

    def unread(self, name: str, *, committed: float, detected: float) -> list[LedgerRow]:
        """Records for a listed checkpoint that is not there to read: `gone`, or `error` if it lies outside.

        Costs no snapshot, so a state file listing thousands of missing checkpoints is recorded at once.
        """
        base = self.begin(name, committed=committed, detected=detected, fingerprint=None)
        if not self.workdir.inside(name):
            return self.failed(base, "error", f"refused: the state file's path {name!r} points outside the workdir")
        return self.failed(base, "gone", f"{base['checkpoint']}.index is gone")

    def begin(self, name: str, *, committed: float, detected: float, fingerprint: str | None) -> Record:
        """The fields every record of checkpoint `name` carries; its `started` time is now."""
        return {"checkpoint": Path(name).name, "step": checkpoints.saver_step(name), "split": self.split_name,
                "committed": committed, "detected": detected, "started": time.time(),
                "data_fingerprint": self.data_fingerprint, "examples": len(self.split), FINGERPRINT: fingerprint}

    def close(self) -> None:
        """Free what the evaluator holds (a session, a graph)."""

    def _evaluate_weights(self, prefix: Path, kind: str) -> Record:
        """The metrics of snapshot `prefix` with weights `kind`; CheckpointError when it cannot be used."""
        raise NotImplementedError

    def failed(self, base: Record, status: str, reason: str) -> list[LedgerRow]:
        """Records of an evaluation that gave no figures: `status` (gone, error, failed) and why."""
        finished = time.time()
        return [LedgerRow(base | {"weights": kind, "status": status, "reason": reason, "finished": finished,
                                  "eval_secs": finished - base["started"]}) for kind in self.weights]


class CheckpointEvaluator(SnapshotEvaluator):
    """Evaluate checkpoints of one of this project's runs: its model, built from run.json.

    Under a `cluster` of several processes (`--strategy multi-worker`) the chief's core tells the
    workers each checkpoint it evaluates, and a worker's core takes part (`take_part`).
    """

    def __init__(self, workdir: Workdir, spec: RunSpec, split: datasets.Split, *, split_name: str,
                 weights: str, cluster: Cluster | None = None) -> None:
        super().__init__(workdir, split, split_name=split_name, weights=weights)
        self.spec = spec
        self.cluster = cluster or Cluster(tf.distribute.get_strategy())
        self.cluster.same_data(self.data_fingerprint, len(split))
        with self.cluster.strategy.scope():  # mirrored variables, which the restores fill on every replica
            self.model = loader.build_model(spec)
        self.evaluate_model = Evaluation(self.model, spec.prepare, strategy=self.cluster.strategy)

    def evaluate_snapshot(self, private: Path, base: Record) -> list[LedgerRow]:
        """See `SnapshotEvaluator.evaluate_snapshot`; a worker that cannot take part makes the records `failed`."""
        step = checkpoints.step_of(private)
        if self.cluster.together:
            if step is None:
                return self.failed(base, "error", f"{base['checkpoint']}: evaluators on several workers read "
                                                  f"only checkpoints named {checkpoints.PREFIX}-<step>")
            self.cluster.tell(step, base[FINGERPRINT])
        try:
            return super().evaluate_snapshot(private, base)
        except PeerProblem as e:
            return self.failed(base, FAILED, str(e))

    def _evaluate_weights(self, prefix: Path, kind: str) -> Record:
        try:
            loader.restore(self.model, prefix, kind)
        except CheckpointError:
            self.cluster.agree(CANNOT_READ)  # the workers skip it too
            raise
        others = self.cluster.agree(0)
        if others:
            raise PeerProblem(describe(others, prefix.name))
        step = checkpoints.read_step(prefix)
        metrics: dict[str, Any] = self.evaluate_model(self.split)
        return {"weights": kind, "step": step, **metrics}

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
                self.evaluate_model(self.split)

    def _restore(self, prefix: Path, kind: str) -> int:
        """Restore weights `kind` of `prefix`: 0, or CANNOT_READ."""
        try:
            loader.restore(self.model, prefix, kind)
        except CheckpointError:
            return CANNOT_READ
        return 0
