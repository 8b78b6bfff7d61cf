"""Evaluating each checkpoint on several devices or processes (`--strategy`): the strategy, and the chief's rounds.

With `mirrored` one process evaluates over several devices, and the strategy is all it needs. With
`multi-worker` several evaluator processes, the chief and worker tasks of a cluster of their own
(`TF_CONFIG`; not the trainer's), each take a shard of every evaluation. Only the chief lists,
leases, pins and records, as a lone evaluator does. For each checkpoint it tells the workers,
through a collective, which step to evaluate (or that it is done); each worker pins that
checkpoint itself, checks that it holds the chief's `.index`, restores it and evaluates along,
and the sums are added across the processes (`common.model.evaluation`). Before each evaluation
every process says whether it restored the weights, so that a checkpoint one of them cannot read
leaves none of them waiting in a collective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import zlib
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from common.distribute import DEFAULT_COLLECTIVE_TIMEOUT, Topology, lost_worker_errors, make_strategy, topology
from common.errors import UsageError, WorkerLostError

# The rows every exchange gathers: [what, sender, a, b, c], with `sender` the process's worker index.
_ORDER, _AGREE, _DATA = 1, 2, 3
_EVALUATE, _IDLE, _DONE = 1, 2, 3  # the orders
# The chief tells idle workers it is there this often (watch mode), well inside the collective timeout.
KEEPALIVE_SECS = 30.0

# Why a process could not take part in an evaluation, as the chief's `failed` record words it.
CANNOT_PIN, NOT_THE_CHIEFS, CANNOT_READ = 1, 2, 3
PROBLEMS = {CANNOT_PIN: "could not pin it", NOT_THE_CHIEFS: "found another checkpoint under its name",
            CANNOT_READ: "could not read it"}


@dataclasses.dataclass(frozen=True)
class Order:
    """What the chief tells the workers: evaluate `step` (whose `.index` has `fingerprint`), wait on, or end."""

    step: int | None  # the checkpoint's step; None: nothing to evaluate yet (a keep-alive) or done
    fingerprint: int = 0  # `code(index fingerprint)` of the chief's pinned copy
    done: bool = False


class PeerProblem(Exception):
    """Another process of a multi-worker evaluation could not take part in it (retried later)."""


def code(text: str | None) -> int:
    """A short number for a fingerprint, as a collective of int64s carries it."""
    return zlib.crc32((text or "").encode("utf-8"))


class Cluster:
    """The strategy this evaluator runs under, and its exchanges with the other processes (none when alone)."""

    def __init__(self, strategy: tf.distribute.Strategy) -> None:
        self.strategy = strategy
        self.topo: Topology = topology(strategy)
        self._started = False  # every process has made its evaluation core (`same_data`): they are in step
        self._done = False
        self._last = time.monotonic()

        @tf.function
        def gather(values: tf.Tensor) -> tf.Tensor:
            per_replica = strategy.run(lambda v: tf.identity(v)[None], args=(values,))
            return strategy.gather(per_replica, axis=0)

        self._gather = gather

    @classmethod
    def make(cls, name: str, devices: int = 0) -> Cluster:
        """The cluster of `--strategy NAME --devices N`; made before any op runs (a multi-worker strategy needs it)."""
        return cls(make_strategy(name, devices=devices, program="evaluator"))

    @property
    def together(self) -> bool:
        """Whether other processes take part in each evaluation."""
        return self.topo.workers > 1

    @property
    def longest_wait(self) -> float:
        """How long the chief may wait for a checkpoint before it must tell the workers it is there."""
        return KEEPALIVE_SECS if self.together else math.inf

    def _exchange(self, what: int, a: int = 0, b: int = 0, c: int = 0) -> np.ndarray:
        """Every process's row `[what, worker, a, b, c]` (a process with several replicas sends it once each).

        Raises:
          UsageError: a process sent another kind of row (the processes are out of step).
          WorkerLostError: another process stopped answering.
        """
        self._last = time.monotonic()
        with lost_worker_errors(self.topo, timeout=f"{DEFAULT_COLLECTIVE_TIMEOUT:g} seconds"):
            rows = self._gather(tf.constant([what, self.topo.worker, a, b, c], tf.int64)).numpy().reshape(-1, 5)
        if (rows[:, 0] != what).any():
            chief = _chiefs(rows)
            if chief[0] == _ORDER and chief[2] == _DONE:
                raise UsageError(f"worker {self.topo.worker}: the chief ended the evaluation early (see its error)")
            raise UsageError(f"worker {self.topo.worker}: the evaluators are out of step")
        return rows

    def same_data(self, fingerprint: str, examples: int) -> None:
        """Refuse to go on unless every process loaded the same split (its content's fingerprint and size)."""
        if not self.together:
            return
        rows = self._exchange(_DATA, code(fingerprint), examples)
        self._started = True
        if len({tuple(row[2:]) for row in rows}) > 1:
            raise UsageError("the evaluators loaded different data (each reads run.json's dataset, and "
                             "--data-dir, on its own machine); give them all the same")

    def tell(self, step: int, fingerprint: str | None) -> None:
        """The chief: have every worker evaluate checkpoint `step` (its pinned copy's `.index` fingerprint)."""
        if self.together:
            self._exchange(_ORDER, _EVALUATE, step, code(fingerprint))

    def listen(self) -> Order:
        """A worker: the chief's next order."""
        _, _, order, step, fingerprint = _chiefs(self._exchange(_ORDER))
        if order != _EVALUATE:
            return Order(None, done=order == _DONE)
        return Order(int(step), int(fingerprint))

    def agree(self, problem: int) -> dict[int, int]:
        """Say whether this process can evaluate (0, or a problem in `PROBLEMS`); return every process's problem."""
        if not self.together:
            return {0: problem} if problem else {}
        return {int(row[1]): int(row[2]) for row in self._exchange(_AGREE, problem) if row[2]}

    def keep_alive(self) -> None:
        """The chief, waiting for checkpoints: tell the workers it is there before their collective times out."""
        if self._started and not self._done and time.monotonic() - self._last > KEEPALIVE_SECS:
            self._exchange(_ORDER, _IDLE)

    def finish(self) -> None:
        """The chief: tell the workers that there is nothing more to evaluate (once).

        Not before they are in step: a chief that failed to make its core has nothing to tell, and
        the workers, waiting for it in `same_data`, find it gone.
        """
        if self._started and not self._done:
            self._done = True
            self._exchange(_ORDER, _DONE)

    @contextlib.contextmanager
    def leading(self) -> Iterator[None]:
        """The chief's run: the workers are told it is done when it ends, however it ends."""
        try:
            yield
        except WorkerLostError:
            self._done = True  # no one is left to tell
            raise
        finally:
            self.finish()


def _chiefs(rows: np.ndarray) -> np.ndarray:
    """The chief's row of an exchange."""
    return rows[rows[:, 1] == 0][0]


def describe(problems: dict[int, int], name: str) -> str:
    """`worker 1 could not pin model-20; ...`: why the processes in `problems` could not evaluate checkpoint `name`."""
    return "; ".join(f"worker {w} {PROBLEMS.get(p, 'failed')} ({name})" for w, p in sorted(problems.items()))
