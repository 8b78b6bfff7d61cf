"""Training on several devices and workers with `tf.distribute`: batches, saves and stopping together.

The step function already runs under any strategy (`trainer.step`); the strategy itself, and this
process's place in the job, come from `common.distribute`, which the evaluator shares. What a
distributed run needs besides is here: the global batch cut into per-replica slices
(`distributed_batches`), the part a worker that is not the chief takes in each save
(`ScratchSaver`), and the few collectives that keep workers in step outside the step function
(`Peers`). Only the chief writes the workdir.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tensorflow as tf

from common.checkpoint import checkpoints
from common.data.datasets import Split
from common.distribute import Topology
from common.errors import UsageError
from common.signals import StopRequest
from common.storage.paths import Location
from trainer.actions import LoopOutput
from trainer.inputs import train_dataset


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

    def poll(self) -> None:
        """Nothing is ever pending: a worker writes its part on its training thread (as save_modes.SyncSaves)."""

    def close(self) -> None:
        """Nothing is ever pending."""


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
