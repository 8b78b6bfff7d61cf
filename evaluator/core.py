"""The evaluation core: a checkpoint path in, records out. It knows nothing of watching or display."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.checkpoint import checkpoints
from common.checkpoint.checkpoints import CheckpointError
from common.data import datasets
from common.model.evaluation import Evaluation
from common.run import loader
from common.run.ledger import FINGERPRINT, Record
from common.run.protocol import LedgerRow
from common.run.spec import RunSpec
from common.run.workdir import Workdir

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
            return self.failed(base, "error", str(e).replace(str(private), base["checkpoint"]))
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
    """Evaluate checkpoints of one of this project's runs: its model, built from run.json."""

    def __init__(self, workdir: Workdir, spec: RunSpec, split: datasets.Split, *, split_name: str,
                 weights: str) -> None:
        super().__init__(workdir, split, split_name=split_name, weights=weights)
        self.spec = spec
        self.model = loader.build_model(spec)
        self.evaluate_model = Evaluation(self.model, spec.prepare)

    def _evaluate_weights(self, prefix: Path, kind: str) -> Record:
        loader.restore(self.model, prefix, kind)
        step = checkpoints.read_step(prefix)
        metrics: dict[str, Any] = self.evaluate_model(self.split)
        return {"weights": kind, "step": step, **metrics}

