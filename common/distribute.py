"""What both programs need of `tf.distribute`: the strategy the flags name, this process's place, lost workers.

The trainer (`trainer.distribute`) and the evaluator (`evaluator.cluster`) take the same
`--strategy {auto,default,mirrored,multi-worker} --devices N` flags; each builds its strategy here,
after `common.tfenv.configure` (which splits the CPU for `--devices`) and before any op runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterator

import tensorflow as tf

from common.cluster import read_task
from common.errors import UsageError, WorkerLostError

STRATEGIES = ("auto", "default", "mirrored", "multi-worker")
DEFAULT_COLLECTIVE_TIMEOUT = 300.0
# The collective errors that mean another worker is gone: refused connections (a dead process),
# a timeout (a hung or unreachable one), or an abort that one of those caused elsewhere.
_LOST = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
         tf.errors.CancelledError)


@dataclasses.dataclass(frozen=True)
class Topology:
    """Where this process stands in the job."""

    strategy: str  # "default", "mirrored" or "multi-worker"
    workers: int  # worker processes in the job
    worker: int  # this process's index among them
    replicas: int  # replicas in sync over all workers
    chief: bool  # whether this process writes the workdir
    chief_name: str = "this process"  # how the log names the chief

    def line(self) -> str:
        """The run's line about its strategy, e.g. `strategy multi-worker: 2 workers, 2 replicas, chief worker 0`."""
        workers = f"{self.workers} worker{'s' * (self.workers != 1)}"
        replicas = f"{self.replicas} replica{'s' * (self.replicas != 1)}"
        me = f" (this is worker {self.worker})" if self.workers > 1 else ""
        return f"strategy {self.strategy}: {workers}, {replicas}, chief {self.chief_name}{me}"


def strategy_name(strategy: tf.distribute.Strategy) -> str:
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "multi-worker"
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return "mirrored"
    return "default"


def topology(strategy: tf.distribute.Strategy) -> Topology:
    """This process's place in the job that `strategy` runs."""
    name = strategy_name(strategy)
    if name != "multi-worker":
        return Topology(name, workers=1, worker=0, replicas=strategy.num_replicas_in_sync, chief=True)
    resolver = strategy.cluster_resolver
    cluster = resolver.cluster_spec().as_dict()
    # TF's convention: the `chief` task when the cluster has one, else worker 0.
    chief_type = "chief" if "chief" in cluster else "worker"
    tasks = [(kind, i) for kind in ("chief", "worker") for i in range(len(cluster.get(kind, [])))]
    me = (resolver.task_type, int(resolver.task_id))
    return Topology(name, workers=len(tasks), worker=tasks.index(me), replicas=strategy.num_replicas_in_sync,
                    chief=me == (chief_type, 0), chief_name=f"{chief_type} 0 ({cluster[chief_type][0]})")


def make_strategy(name: str, *, devices: int = 0, collective_timeout: float = DEFAULT_COLLECTIVE_TIMEOUT,
                  program: str = "trainer") -> tf.distribute.Strategy:
    """The strategy `--strategy NAME` asks for; call it after `common.tfenv.configure`, before any op.

    `devices` (`--devices N`) picks N logical CPU devices for `mirrored`, which `configure` made.
    `program` names the caller in the refusals of a `TF_CONFIG` (`check_tf_config`).

    Raises:
      UsageError: an unknown name, `--devices` without `mirrored`, or a missing or bad `TF_CONFIG`.
    """
    check_flags(name, devices)
    if name == "mirrored":
        return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(devices)] if devices else None)
    if name == "multi-worker":
        check_tf_config(os.environ.get("TF_CONFIG"), program=program)
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=collective_timeout)
        try:
            return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        except (ValueError, tf.errors.OpError) as e:
            raise UsageError(f"--strategy multi-worker: TF_CONFIG: {str(e).splitlines()[0]}") from e
    if name == "auto" and len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def check_flags(name: str, devices: int) -> None:
    """Refuse an unknown `--strategy`, and `--devices` without `mirrored`."""
    if name not in STRATEGIES:
        raise UsageError(f"--strategy ({name!r}) must be one of: {', '.join(STRATEGIES)}")
    if devices < 0:
        raise UsageError(f"--devices ({devices}) must not be negative")
    if devices and name != "mirrored":
        raise UsageError(f"--devices ({devices}) goes with --strategy mirrored")


# How each program's refusals of a TF_CONFIG end: where a good one comes from, and which task types it runs as.
_TF_CONFIG_HINTS = {
    "trainer": ("`trainer --workers N` sets it for N local workers", "the trainer runs as a chief or worker task"),
    "evaluator": ("each evaluator process a chief or worker task of a cluster of the evaluators' own",
                  "--strategy multi-worker runs evaluators as the chief and worker tasks of their own cluster "
                  "(an `evaluator` task evaluates alone, with the default strategy)"),
}


def check_tf_config(text: str | None, *, program: str = "trainer") -> None:
    """Refuse a missing or malformed `TF_CONFIG` with one line, before TF reads it."""
    source, roles = _TF_CONFIG_HINTS[program]
    if not text:
        raise UsageError(f"--strategy multi-worker needs TF_CONFIG (cluster and task); {source}")
    task = read_task(text)
    assert task is not None  # `text` is not empty
    kind, index = task.type, task.index
    addresses = task.cluster.get(kind, [])
    if kind not in ("chief", "worker"):
        raise UsageError(f"TF_CONFIG: task type {kind!r}: {roles}")
    if not 0 <= index < len(addresses):
        raise UsageError(f"TF_CONFIG: task {kind} {index} is not in the cluster's {len(addresses)} {kind} address(es)")


@contextlib.contextmanager
def lost_worker_errors(topo: Topology, *, timeout: str = "--collective-timeout seconds") -> Iterator[None]:
    """Turn a failed collective of a multi-worker job into one `WorkerLostError` line.

    `timeout` says how long a collective waits, as the program's own flags put it.
    """
    try:
        yield
    except _LOST as e:
        if topo.workers == 1:
            raise
        text = str(e)
        peer = re.search(r"/job:(\w+)/replica:\d+/task:(\d+)", text)
        if peer:
            raise WorkerLostError(f"worker {topo.worker}: lost contact with {peer[1]} {peer[2]} "
                                  f"({type(e).__name__}); ending") from e
        if isinstance(e, tf.errors.DeadlineExceededError):
            raise WorkerLostError(f"worker {topo.worker}: a collective timed out (another worker stopped "
                                  f"answering for {timeout}); ending") from e
        first = next((line for line in text.splitlines() if line.strip()), type(e).__name__)
        raise WorkerLostError(f"worker {topo.worker}: a collective failed ({first[:200]}); ending") from e
