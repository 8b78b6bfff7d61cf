"""Accuracy, loss and per-class accuracy of a model on a split: the numbers both programs report."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from common.data.datasets import Split
from common.model.models import Classifier

EVAL_BATCH_SIZE = 1000


class Evaluation:
    """Evaluate one model instance; the `tf.function` is traced once and reused."""

    def __init__(self, model: Classifier, prepare: Callable[[tf.Tensor], tf.Tensor], *,
                 batch_size: int = EVAL_BATCH_SIZE) -> None:
        """`prepare` turns stored images into the model's inputs (`RunSpec.prepare`)."""
        self.model = model
        self.batch_size = batch_size
        num_classes = model.num_classes

        @tf.function
        def batch_stats(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            logits = model(prepare(images))
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
            correct = tf.cast(tf.equal(tf.argmax(logits, axis=1), labels), tf.int64)
            per_class_correct = tf.math.bincount(
                tf.cast(labels, tf.int32), weights=correct, minlength=num_classes, maxlength=num_classes,
                dtype=tf.int64)
            return loss, tf.reduce_sum(correct), per_class_correct

        self._batch_stats = batch_stats
        self._num_classes = num_classes

    def __call__(self, split: Split) -> dict[str, Any]:
        """Return `accuracy`, `loss` (mean cross-entropy), `per_class_accuracy` and `count`."""
        loss_sum, correct = 0.0, 0
        per_class = np.zeros(self._num_classes, dtype=np.int64)
        for start in range(0, len(split), self.batch_size):
            stop = start + self.batch_size
            loss, n_correct, by_class = self._batch_stats(split.images[start:stop], split.labels[start:stop])
            loss_sum += float(loss)
            correct += int(n_correct)
            per_class += by_class.numpy()
        totals = np.bincount(split.labels, minlength=self._num_classes)
        return {
            "accuracy": correct / len(split),
            "loss": loss_sum / len(split),
            "per_class_accuracy": [float(c / t) if t else None for c, t in zip(per_class, totals, strict=True)],
            "count": len(split),
        }
