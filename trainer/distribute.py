"""Training on several devices and workers with `tf.distribute`: the strategy, who is chief, stopping together.

The step function already runs under any strategy (`trainer.step`). What a distributed run needs
besides is here: building the strategy from the flags (`make_strategy`), this process's place in
the job (`Topology`), the global batch cut into per-replica slices (`distributed_batches`), the
part a worker that is not the chief takes in each save (`ScratchSaver`), and the few collectives
that keep workers in step outside the step function (`Peers`). Only the chief writes the workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import tensorflow as tf

from common.checkpoint import checkpoints
from common.data.datasets import Split
from common.errors import UsageError, WorkerLostError
from common.signals import StopRequest
from common.storage.paths import Location
from trainer.actions import LoopOutput
from trainer.inputs import train_dataset

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
    replicas: int  # replicas in sync over all workers; each takes batch_size / replicas images a step
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


def make_strategy(name: str, *, devices: int = 0,
                  collective_timeout: float = DEFAULT_COLLECTIVE_TIMEOUT) -> tf.distribute.Strategy:
    """The strategy `--strategy NAME` asks for; call it after `common.tfenv.configure`, before any op.

    `devices` (`--devices N`) picks N logical CPU devices for `mirrored`, which `configure` made.

    Raises:
      UsageError: an unknown name, `--devices` without `mirrored`, or a missing or bad `TF_CONFIG`.
    """
    if name not in STRATEGIES:
        raise UsageError(f"--strategy ({name!r}) must be one of: {', '.join(STRATEGIES)}")
    if devices and name != "mirrored":
        raise UsageError(f"--devices ({devices}) goes with --strategy mirrored")
    if name == "mirrored":
        return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(devices)] if devices else None)
    if name == "multi-worker":
        check_tf_config(os.environ.get("TF_CONFIG"))
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=collective_timeout)
        try:
            return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        except (ValueError, tf.errors.OpError) as e:
            raise UsageError(f"--strategy multi-worker: TF_CONFIG: {str(e).splitlines()[0]}") from e
    if name == "auto" and len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def check_tf_config(text: str | None) -> None:
    """Refuse a missing or malformed `TF_CONFIG` with one line, before TF reads it."""
    if not text:
        raise UsageError("--strategy multi-worker needs TF_CONFIG (cluster and task); "
                         "`trainer --workers N` sets it for N local workers")
    try:
        config = json.loads(text)
        kind, index = config["task"]["type"], int(config["task"]["index"])
        addresses = config["cluster"][kind]
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"TF_CONFIG ({text[:200]!r}) is not a JSON object with cluster and task: {e}") from e
    if kind not in ("chief", "worker"):
        raise UsageError(f"TF_CONFIG: task type {kind!r}: the trainer runs as a chief or worker task")
    if not 0 <= index < len(addresses):
        raise UsageError(f"TF_CONFIG: task {kind} {index} is not in the cluster's {len(addresses)} {kind} address(es)")


def check_batch(batch_size: int, topo: Topology) -> None:
    """The global batch must split evenly among the replicas."""
    if batch_size % topo.replicas:
        raise UsageError(f"--batch-size ({batch_size}) must be a multiple of the {topo.replicas} replicas "
                         f"({topo.strategy}): each replica takes an equal slice of the global batch")


def distributed_batches(strategy: tf.distribute.Strategy, split: Split, *, batch_size: int, seed: int,
                        start_step: int, prepare: Callable[[tf.Tensor], tf.Tensor]) -> Any:
    """The global batches of `trainer.inputs.train_dataset`, each replica fed its own slice of every one.

    The global batches are the same whatever the number of workers; a worker's input pipeline
    yields its replicas' slices in replica order, which is how TF hands them out to its devices.
    """
    def per_worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
        local = context.num_replicas_in_sync // context.num_input_pipelines
        return train_dataset(split, batch_size=batch_size, seed=seed, start_step=start_step, prepare=prepare,
                             replicas=context.num_replicas_in_sync, first_replica=context.input_pipeline_id * local,
                             local_replicas=local)

    return strategy.distribute_datasets_from_function(per_worker)


class ScratchSaver:
    """A non-chief worker's part in a save: TF needs every worker to write; this one writes to a private
    temporary folder outside the workdir and removes it at once (as TF's multi-worker guides do)."""

    def __init__(self, workdir: Location, checkpoint: tf.train.Checkpoint) -> None:
        self.workdir = workdir
        self._write = tf.function(lambda prefix: checkpoint.write(prefix))

    def save(self, step: int) -> Location:
        """Take part in the save of `step`; return the chief's prefix for it."""
        name = checkpoints.name_for(step)
        folder = tempfile.mkdtemp(prefix="trainer-worker-")
        try:
            self._write(tf.constant(str(Path(folder) / name)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return self.workdir / name


class Peers:
    """The collectives outside the step: the same start step on every worker, and one stop for all.

    Signals, and on the chief the evaluator's stop request, land in `requests`. After each call of
    the inner loop the workers exchange them (`__call__`, an action every worker runs) and `stop`
    is set on all of them at once, so that every worker takes part in the same last save.
    """

    def __init__(self, strategy: tf.distribute.Strategy, stop: StopRequest) -> None:
        self.stop = stop
        self.requests = StopRequest()

        @tf.function
        def gather(values: tf.Tensor) -> tf.Tensor:
            per_replica = strategy.run(lambda v: tf.identity(v)[None], args=(values,))
            return strategy.gather(per_replica, axis=0)

        self._gather = gather

    def same_start(self, step: int) -> None:
        """Fail unless every worker restored the same step (they read one workdir, so they should)."""
        steps = sorted(set(self._gather(tf.constant([step], tf.int64)).numpy().ravel().tolist()))
        if len(steps) > 1:
            raise UsageError(f"the workers restored different steps ({', '.join(map(str, steps))}); "
                             "they must all see the chief's workdir (a shared filesystem)")

    def __call__(self, out: LoopOutput) -> None:
        mine = self.requests
        flags = self._gather(tf.constant([bool(mine) and not mine.finish, bool(mine) and mine.finish], tf.int32))
        signalled, finished = flags.numpy().reshape(-1, 2).any(axis=0)
        if self.stop:
            return
        # A signal to any worker outranks the chief's early stop, as in a single process.
        if signalled:
            self.stop.set(mine.reason if mine.reason and not mine.finish else "a signal to another worker")
        elif finished:
            self.stop.set(mine.reason or "the chief's early stop", finish=True)


@contextlib.contextmanager
def lost_worker_errors(topo: Topology) -> Iterator[None]:
    """Turn a failed collective of a multi-worker job into one `WorkerLostError` line."""
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
                                  "answering for --collective-timeout seconds); ending") from e
        first = next((line for line in text.splitlines() if line.strip()), type(e).__name__)
        raise WorkerLostError(f"worker {topo.worker}: a collective failed ({first[:200]}); ending") from e
