"""`Evaluation` under a strategy: every example counted once, every figure that of one device.

The split's size divides neither by the two replicas (conftest's logical CPUs) nor by the batch,
so the last batch is padded for the replicas; counting the padding would make `count` 1002.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from common.data.datasets import Split
from common.model.evaluation import Evaluation, padded
from tests.helpers import make_images, mirrored, mnist_model

EXAMPLES, BATCH = 1001, 100


def prepare(images: tf.Tensor) -> tf.Tensor:
    return tf.cast(images, tf.float32)[..., None] / 255.0


@pytest.fixture(scope="module")
def split() -> Split:
    images, labels = make_images(EXAMPLES, seed=3)
    return Split(images, labels.astype(np.int64))


def models(strategy: tf.distribute.Strategy) -> tuple[Any, Any]:
    """The same weights twice: on one device, and mirrored under `strategy`."""
    one = mnist_model("mlp", seed=1)
    with strategy.scope():
        both = mnist_model("mlp", seed=2)
    for name, var in both.named_variables().items():
        var.assign(one.named_variables()[name])
    return one, both


def test_mirrored_gives_every_figure_of_one_device(split: Split) -> None:
    one, both = models(mirrored())
    alone = Evaluation(one, prepare, batch_size=BATCH)(split)
    sharded = Evaluation(both, prepare, batch_size=BATCH, strategy=mirrored())(split)
    assert sharded["count"] == alone["count"] == EXAMPLES
    assert sharded["confusion"] == alone["confusion"]
    for key in ("accuracy", "per_class_accuracy"):
        assert sharded[key] == alone[key], key
    assert sharded["loss"] == pytest.approx(alone["loss"], abs=1e-6)
    assert sorted(sharded) == sorted(alone) == ["accuracy", "confusion", "count", "loss", "per_class_accuracy"]


def test_figures_are_numpys_from_the_logits(split: Split) -> None:
    model = mnist_model("mlp", seed=1)
    result = Evaluation(model, prepare, batch_size=BATCH)(split)
    logits = model(prepare(split.images)).numpy().astype(np.float64)
    predicted = logits.argmax(axis=1)
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (split.labels, predicted), 1)
    assert result["confusion"] == confusion.tolist() and np.sum(result["confusion"]) == EXAMPLES
    assert result["accuracy"] == np.mean(predicted == split.labels)
    totals = confusion.sum(axis=1)
    assert result["per_class_accuracy"] == [confusion[i, i] / t if t else None for i, t in enumerate(totals)]
    shifted = logits - logits.max(axis=1, keepdims=True)
    losses = np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(EXAMPLES), split.labels]
    assert result["loss"] == pytest.approx(losses.mean(), abs=1e-6)


def test_a_batch_is_padded_to_the_replicas_and_masked() -> None:
    images, labels = np.ones((7, 2, 2), np.uint8), np.arange(7)
    more, classes, mask = padded(images, labels, 3)
    assert more.shape == (9, 2, 2) and classes.tolist() == [*range(7), 0, 0]
    assert mask.tolist() == [True] * 7 + [False] * 2 and not more[7:].any()
    same = padded(images, labels, 7)
    assert same[0] is images and same[2].all()


def test_a_model_built_outside_the_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match=r"the model's variables \(fc1/kernel, .*not created under the strategy"):
        Evaluation(mnist_model("mlp"), prepare, strategy=mirrored())
