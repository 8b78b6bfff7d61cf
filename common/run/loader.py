"""One way to build a run's model and restore its EMA or raw weights from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from common.checkpoint import checkpoints
from common.model import models, registry
from common.model.ema import raw_variables, variables_to_restore
from common.run.spec import RunSpec

WEIGHTS = ("ema", "raw")  # ema: the moving averages the trainer keeps; raw: the trained weights


def build_model(spec: RunSpec) -> models.Classifier:
    """The run's model, freshly initialised, with as many classes as the run was trained on."""
    return registry.build(spec.model, num_classes=spec.num_classes, input_shape=spec.input.shape)


def weight_mapping(model: models.Classifier, weights: str) -> dict[str, tf.Variable]:
    """The checkpoint key of each of `model`'s variables, for the EMA shadows or the raw weights.

    Raises:
      ValueError: `weights` is neither "ema" nor "raw".
    """
    if weights not in WEIGHTS:
        raise ValueError(f"`weights` ({weights!r}) must be one of {WEIGHTS}")
    return variables_to_restore(model) if weights == "ema" else raw_variables(model)


def restore(model: models.Classifier, prefix: Path, weights: str = "ema") -> None:
    """Load checkpoint `prefix`'s EMA (or raw) weights into `model`.

    Raises:
      CheckpointError: the checkpoint cannot be read, or lacks a key or a shape the model needs;
        no variable is changed then.
      ValueError: `weights` is neither "ema" nor "raw".
    """
    checkpoints.restore_variables(prefix, weight_mapping(model, weights))


def load_model(spec: RunSpec, prefix: Path, weights: str = "ema") -> models.Classifier:
    """Build the run's model and restore checkpoint `prefix`'s weights into it.

    Args:
      spec: the run's settings (`run.json`): which model, and how many classes.
      prefix: the checkpoint, e.g. from `common.run.locate.locate`.
      weights: "ema" for the moving averages, "raw" for the trained weights.

    Returns:
      The model, ready to call on `spec.prep.apply(images, spec.input)`.

    Raises:
      CheckpointError: the checkpoint cannot be read, or does not fit the model.
      ValueError: `weights` is neither "ema" nor "raw".
    """
    model = build_model(spec)
    restore(model, prefix, weights)
    return model
