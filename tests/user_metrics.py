"""Users' metrics for `evaluator --metric tests.user_metrics:NAME`: good ones, and ones that break the contract."""

from __future__ import annotations

from typing import Any

import tensorflow as tf


def hits(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """1 per correctly classified example: its mean over a split is the accuracy, exactly."""
    return tf.cast(tf.equal(tf.argmax(logits, axis=1), labels), tf.float32)


def mean_margin(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """The batch's mean of (true logit - largest other logit): a scalar per batch, weighted by its size."""
    true = tf.gather(logits, labels, batch_dims=1)
    others = tf.where(tf.one_hot(labels, tf.shape(logits)[1]) > 0, -1e9 * tf.ones_like(logits), logits)
    return tf.reduce_mean(true - tf.reduce_max(others, axis=1))


def raises(labels: tf.Tensor, logits: tf.Tensor) -> Any:
    raise ValueError("no metric today")


def per_class_shape(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Wrong: one value per class, not per example."""
    return tf.reduce_mean(logits, axis=0)


def not_a_number(labels: tf.Tensor, logits: tf.Tensor) -> Any:
    return "high"
