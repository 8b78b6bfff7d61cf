"""The training input pipeline: a pure function of (seed, step), so a resumed run sees the same batches.

Each epoch is a stateless shuffle of the indices seeded by (seed, epoch), cut into full batches;
resuming at step s starts at epoch s // steps_per_epoch and skips the batches already seen.
Batches are gathered from the in-memory array (or, for a folder too large for memory, decoded from
its files) and turned into model inputs on the fly, by the dataset's own preprocessing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

from common.data.datasets import Split
from common.errors import UsageError


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch (the remainder of each shuffled epoch is dropped)."""
    if batch_size > num_examples:
        raise UsageError(f"--batch-size ({batch_size}) is larger than the training split ({num_examples} images)")
    return num_examples // batch_size


def train_dataset(split: Split, *, batch_size: int, seed: int, start_step: int,
                  prepare: Callable[[tf.Tensor], tf.Tensor], replicas: int = 1, first_replica: int = 0,
                  local_replicas: int = 1) -> tf.data.Dataset:
    """Endless batches of (model inputs float32 [B, H, W, C], labels int64 [B]) from `start_step` on.

    `prepare` turns stored images into model inputs (`RunSpec.prepare`). Under a `tf.distribute`
    strategy each global batch of `batch_size` is cut into `replicas` equal slices, and this
    pipeline yields the slices `first_replica` to `first_replica + local_replicas - 1` of every
    global batch, in that order (B = batch_size / replicas).
    """
    n = len(split)
    per_replica = batch_size // replicas
    per_epoch = steps_per_epoch(n, batch_size)
    load = _loader(split)
    labels = tf.constant(split.labels)
    first_epoch, skip = divmod(start_step, per_epoch)

    def epoch_batches(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )
        batches = tf.reshape(order[: per_epoch * batch_size], [per_epoch, replicas, per_replica])
        mine = batches[:, first_replica:first_replica + local_replicas]
        return tf.data.Dataset.from_tensor_slices(tf.reshape(mine, [per_epoch * local_replicas, per_replica]))

    def gather(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return prepare(load(index)), tf.gather(labels, index)

    return (
        tf.data.Dataset.range(first_epoch, 2**62)
        .flat_map(epoch_batches)
        .skip(skip * local_replicas)
        .map(gather, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
        .with_options(_NO_AUTOTUNE_THREAD)
    )


# With tf.data's autotuning on, dropping the iterator at the end of training sometimes blocked in its
# destructor, waiting for a background thread: 28 to 47 s in 4 of 9 default runs, 10 to 16 s in 4 of 8
# short ones, between the last step and the final evaluation. Without it none of 6 short and 20 full runs
# did, at the same speed: the pipeline is a gather and a scale, and AUTOTUNE then means one call per core.
_NO_AUTOTUNE_THREAD = tf.data.Options()
_NO_AUTOTUNE_THREAD.autotune.enabled = False


def _loader(split: Split) -> Callable[[tf.Tensor], tf.Tensor]:
    """`load(indices) -> stored images`: gathered from memory, or decoded from the files of a too large folder."""
    if isinstance(split.images, np.ndarray):
        images = tf.constant(split.images)
        return lambda index: tf.gather(images, index)
    shape = [None, *split.images.shape[1:]]  # common.data.userdata.FileImages

    def decode(index: tf.Tensor) -> tf.Tensor:
        batch = tf.numpy_function(split.images.__getitem__, [index], tf.uint8, stateful=False)
        return tf.ensure_shape(batch, shape)

    return decode
