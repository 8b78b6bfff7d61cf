"""Accuracy, loss, per-class accuracy, the confusion matrix, top-k accuracy and a user's metrics of a model on a split.

Under a `tf.distribute` strategy each replica takes an equal slice of every batch. A batch that
does not divide among the replicas is padded, and a mask keeps the padding out of every sum, so
that each example counts exactly once: sharding without it counted 992 of 1,000 examples on two
GPUs (tensorflow/tensorflow#25284). The replicas' sums are added across replicas (and workers),
the loss in float64, so that a strategy gives one device's figures: the counts exactly, the loss
to rounding far below 1e-6. A user's metric (common.model.metrics) is called on the host with the
real examples of each batch only, their logits gathered from the replicas.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from common.data.datasets import Split
from common.model.metrics import UserMetric, top_k_name
from common.model.models import Classifier

EVAL_BATCH_SIZE = 1000
_SUM = tf.distribute.ReduceOp.SUM


def padded(images: np.ndarray, labels: np.ndarray, replicas: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One batch padded with zeros to a multiple of `replicas`, and the mask that is true on its real examples."""
    size = -(-len(labels) // replicas) * replicas
    mask = np.arange(size) < len(labels)
    if size == len(labels):
        return images, labels, mask
    pad = size - len(labels)
    return (np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)]),
            np.concatenate([labels, np.zeros(pad, labels.dtype)]), mask)


def batches(split: Split, batch_size: int, replicas: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The split in batches of `batch_size`, each padded for `replicas` (`padded`)."""
    for start in range(0, len(split), batch_size):
        yield padded(split.images[start:start + batch_size], split.labels[start:start + batch_size], replicas)


class Evaluation:
    """Evaluate one model instance under one strategy; the `tf.function` is traced once per batch shape and reused."""

    def __init__(self, model: Classifier, prepare: Callable[[tf.Tensor], tf.Tensor], *,
                 batch_size: int = EVAL_BATCH_SIZE, strategy: tf.distribute.Strategy | None = None,
                 top_k: int = 0, metrics: tuple[UserMetric, ...] = ()) -> None:
        """`prepare` turns stored images into the model's inputs (`RunSpec.prepare`).

        `top_k`: also count the examples whose label is among the k highest logits (0: not);
        `metrics`: users' metrics, whose values come under `metrics` with top-k accuracy.

        With a `strategy` other than TF's default, the model's variables must have been created
        under its scope (`strategy.scope()`), so that every replica reads its own copy.

        Raises:
          ValueError: `batch_size` is not positive, `top_k` is not below the classes, or a variable was
            not created under `strategy`'s scope.
        """
        if batch_size < 1:
            raise ValueError(f"`batch_size` ({batch_size}) must be a positive integer")
        if not 0 <= top_k < model.num_classes:
            raise ValueError(f"`top_k` ({top_k}) must be 0 (off) or below the model's {model.num_classes} classes")
        self.model = model
        self.batch_size = batch_size
        self.strategy = strategy or tf.distribute.get_strategy()
        outside = [k for k, v in model.named_variables().items()
                   if not self.strategy.extended.variable_created_in_scope(v)]
        if outside:
            raise ValueError(f"the model's variables ({', '.join(outside[:3])}, ...) were not created under "
                             f"the strategy's scope ({type(self.strategy).__name__})")
        self._num_classes = num_classes = model.num_classes
        self.top_k, self.metrics = top_k, metrics
        gather = bool(metrics)  # the logits leave the device only for a user's metric

        def replica_sums(images: tf.Tensor, labels: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, ...]:
            logits = model(prepare(images))
            losses = tf.cast(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits), tf.float64)
            confusion = tf.math.confusion_matrix(labels, tf.argmax(logits, axis=1), num_classes,
                                                 weights=tf.cast(mask, tf.int64), dtype=tf.int64)
            top = tf.constant(0, tf.int64)
            if top_k:
                top = tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, top_k) & mask, tf.int64))
            return (tf.reduce_sum(tf.where(mask, losses, tf.zeros_like(losses))), confusion, top,
                    logits if gather else tf.zeros([0]))

        @tf.function(reduce_retracing=True)  # one trace serves every set's batch shapes, not one per shape
        def batch_sums(per_replica: Any) -> tuple[tf.Tensor, ...]:
            loss, confusion, top, logits = self.strategy.run(replica_sums, args=per_replica)
            sums = tuple(self.strategy.reduce(_SUM, v, axis=None) for v in (loss, confusion, top))
            return (*sums, self.strategy.gather(logits, axis=0) if gather else tf.zeros([0]))

        self._batch_sums = batch_sums

    def _shards(self, batch: tuple[np.ndarray, ...]) -> Any:
        """A padded batch cut into one equal slice per replica, each placed on its replica's device."""
        per = len(batch[0]) // self.strategy.num_replicas_in_sync

        def slice_of(context: tf.distribute.ValueContext) -> tuple[tf.Tensor, ...]:
            first = context.replica_id_in_sync_group * per
            return tuple(tf.constant(a[first:first + per]) for a in batch)

        return self.strategy.experimental_distribute_values_from_function(slice_of)

    def __call__(self, split: Split) -> dict[str, Any]:
        """Return `accuracy`, `loss` (mean cross-entropy), `per_class_accuracy`, `confusion`, `count` and `metrics`.

        `confusion[i][j]` counts the examples of class i predicted as j; `count`, the examples
        counted (the confusion matrix's sum), is the split's size. `metrics` holds top-k accuracy
        (`top<k>_accuracy`) and each user's metric by its name, when asked for.

        Raises:
          MetricError: a user's metric broke its contract (common.model.metrics).
        """
        loss_sum, top_sum = 0.0, 0
        user_sums = [0.0] * len(self.metrics)
        confusion = np.zeros((self._num_classes, self._num_classes), dtype=np.int64)
        for batch in batches(split, self.batch_size, self.strategy.num_replicas_in_sync):
            loss, counts, top, logits = self._batch_sums(self._shards(batch))
            loss_sum += float(loss)
            top_sum += int(top)
            confusion += counts.numpy()
            if self.metrics:
                real = batch[2]
                for i, metric in enumerate(self.metrics):
                    user_sums[i] += metric.batch_sum(batch[1][real], logits.numpy()[real])
        correct, totals = np.diagonal(confusion), confusion.sum(axis=1)
        metrics = {top_k_name(self.top_k): top_sum / len(split)} if self.top_k else {}
        metrics |= {m.name: total / len(split) for m, total in zip(self.metrics, user_sums, strict=True)}
        return {
            "accuracy": int(correct.sum()) / len(split),
            "loss": loss_sum / len(split),
            "per_class_accuracy": [float(c / t) if t else None for c, t in zip(correct, totals, strict=True)],
            "confusion": confusion.tolist(),
            "count": int(confusion.sum()),
            **({"metrics": metrics} if metrics else {}),
        }
