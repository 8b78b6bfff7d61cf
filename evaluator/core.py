"""The evaluation core: a checkpoint path in, records out. It knows nothing of watching or display."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from common.checkpoint import checkpoints
from common.checkpoint.checkpoints import CheckpointError
from common.data import datasets
from common.model.evaluation import Evaluation
from common.run import loader
from common.run.spec import RunSpec
from common.storage import Gone, open_storage
from common.storage.paths import Workdir
from evaluator.ledger import FAILED, FINGERPRINT, Record

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

    def evaluate(self, name: str, *, committed: float, detected: float, fingerprint: str | None = None,
                 keep: Callable[[Path, list[Record]], None] | None = None) -> list[Record]:
        """Evaluate checkpoint `name` of the workdir; one record per weights kind.

        Never raises for a bad checkpoint: a deleted one gives `status: gone`, an unreadable one
        (truncated, corrupt, missing EMA shadows) `status: error` with the reason. A problem of this
        machine rather than of the checkpoint (the snapshot cannot be made: full disk, no permission)
        gives `status: failed`, which is retried later. Records carry the `.index` fingerprint of the
        files evaluated (`fingerprint`, the one seen when listing, until then). `keep`, if given,
        is called with the private snapshot's prefix and the ok records before the snapshot is
        removed (it may move the snapshot folder away to keep the files).
        """
        base = self._base(name, committed=committed, detected=detected, fingerprint=fingerprint)
        if not checkpoints.inside(self.workdir, name):
            return self.unread(name, committed=committed, detected=detected)
        try:
            with open_storage(self.workdir).pin(Path(name).name) as private:  # inside: a key at the root
                base[FINGERPRINT] = checkpoints.index_fingerprint(private)
                try:
                    results = [self._evaluate_weights(private, kind) for kind in self.weights]
                except CheckpointError as e:  # name the checkpoint, not the private snapshot
                    return self._failed(base, "error", str(e).replace(str(private), base["checkpoint"]))
                finished = time.time()
                records = [base | r | {"status": "ok", "finished": finished, "eval_secs": finished - base["started"]}
                           for r in results]
                if keep is not None:
                    keep(private, records)
                return records
        except Gone as e:
            return self._failed(base | {FINGERPRINT: None}, "gone", str(e))
        except OSError as e:
            return self._failed(base, FAILED, f"cannot snapshot {base['checkpoint']}: {e.strerror or e}")

    def unread(self, name: str, *, committed: float, detected: float) -> list[Record]:
        """Records for a listed checkpoint that is not there to read: `gone`, or `error` if it lies outside.

        Costs no snapshot, so a state file listing thousands of missing checkpoints is recorded at once.
        """
        base = self._base(name, committed=committed, detected=detected, fingerprint=None)
        if not checkpoints.inside(self.workdir, name):
            return self._failed(base, "error", f"refused: the state file's path {name!r} points outside the workdir")
        return self._failed(base, "gone", f"{base['checkpoint']}.index is gone")

    def _base(self, name: str, *, committed: float, detected: float, fingerprint: str | None) -> Record:
        return {"checkpoint": Path(name).name, "step": checkpoints.saver_step(name), "split": self.split_name,
                "committed": committed, "detected": detected, "started": time.time(),
                "data_fingerprint": self.data_fingerprint, "examples": len(self.split), FINGERPRINT: fingerprint}

    def close(self) -> None:
        """Free what the evaluator holds (a session, a graph)."""

    def _evaluate_weights(self, prefix: Path, kind: str) -> Record:
        """The metrics of snapshot `prefix` with weights `kind`; CheckpointError when it cannot be used."""
        raise NotImplementedError

    def _failed(self, base: Record, status: str, reason: str) -> list[Record]:
        finished = time.time()
        return [base | {"weights": kind, "status": status, "reason": reason, "finished": finished,
                        "eval_secs": finished - base["started"]} for kind in self.weights]


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

