"""A user's metric, `--metric pkg.mod:fn`: called on each batch's labels and logits, reduced exactly.

The contract: `fn(labels, logits)` gets the labels (int64 `[n]`) and the logits (float32
`[n, classes]`) of one batch's real examples as eager tensors, and returns either one value per
example (shape `[n]`) or the batch's mean (a scalar). The metric of a split is the mean over its
examples: per-example values are summed, a batch mean is weighted by its batch's size, and the
total is divided by the split's size. It is exact whatever the batch size or the sharding, since
padding never reaches `fn`. Anything else (an exception, another shape, a value that is not a
finite number) breaks the contract and is a `MetricError` naming the metric.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from common.errors import UsageError
from common.reference import first_line, import_function

FLAG = "--metric"
PROBE_EXAMPLES = 8  # the contract is checked on this many examples before any evaluation
# Names a ledger row already gives a meaning (a user metric is kept under `metrics` beside top-k).
RESERVED = re.compile(r"^(accuracy|loss|top\d+_accuracy)$")


class MetricError(UsageError):
    """A user's metric raised, or returned something the contract does not allow."""


def top_k_name(k: int) -> str:
    """The ledger's name for top-k accuracy."""
    return f"top{k}_accuracy"


def metric_name(reference: str) -> str:
    """The name a `--metric pkg.mod:fn` is recorded under: its function's name."""
    return reference.partition(":")[2]


@dataclasses.dataclass(frozen=True)
class UserMetric:
    """One `--metric` function and the name its value is recorded under (the function's name)."""

    reference: str  # pkg.mod:fn as given
    fn: Callable[[tf.Tensor, tf.Tensor], Any]

    @property
    def name(self) -> str:
        return metric_name(self.reference)

    def batch_sum(self, labels: np.ndarray, logits: np.ndarray) -> float:
        """The sum of the metric over one batch's `n` examples (n x the batch mean, or the per-example sum)."""
        n = len(labels)
        try:
            value = self.fn(tf.constant(labels, tf.int64), tf.constant(logits, tf.float32))
            array = np.asarray(value, dtype=np.float64)
        except Exception as e:  # a user's code can raise anything
            raise MetricError(f"{FLAG} {self.reference} raised {type(e).__name__}: {first_line(e)}") from None
        if array.shape not in ((), (n,)):
            raise MetricError(f"{FLAG} {self.reference} returned shape {list(array.shape)} for a batch of {n}: "
                              f"it must return a scalar (the batch's mean) or one value per example ([{n}])")
        total = float(array.sum()) if array.shape else float(array) * n
        if not math.isfinite(total):
            raise MetricError(f"{FLAG} {self.reference} returned a value that is not a finite number ({total})")
        return total

    def check(self, labels: np.ndarray, num_classes: int) -> None:
        """Call the metric on a few labels with uniform and random logits; MetricError if it breaks the contract."""
        labels = np.asarray(labels[:PROBE_EXAMPLES], dtype=np.int64)
        rng = np.random.default_rng(0)
        for logits in (np.zeros((len(labels), num_classes), np.float32),
                       rng.normal(size=(len(labels), num_classes)).astype(np.float32)):
            self.batch_sum(labels, logits)


def load_metrics(references: tuple[str, ...]) -> tuple[UserMetric, ...]:
    """Import each `--metric` reference; UsageError for one that cannot be imported, or two of one name."""
    metrics = tuple(UserMetric(ref, import_function(ref, FLAG)) for ref in references)
    names = [m.name for m in metrics]
    for m in metrics:
        if RESERVED.match(m.name):
            raise UsageError(f"{FLAG} {m.reference}: {m.name!r} is a built-in metric's name; rename the function")
        if names.count(m.name) > 1:
            raise UsageError(f"{FLAG}: two metrics are called {m.name!r}; each needs a name of its own")
    return metrics
