"""Which model a `--model` name means: a registered built-in one, or a user's `module.path:function`.

The one place that chooses; everything else asks it.
"""

from __future__ import annotations

from common.errors import UsageError
from common.model import models, usermodel
from common.reference import is_reference


def is_known(name: str) -> bool:
    """Whether `name` is a registered model or a `module.path:function` reference (not imported yet)."""
    return name in models.MODELS or is_reference(name)


def check(name: str) -> None:
    """Refuse a name that is neither a registered model nor a reference.

    Raises:
      UsageError: the message lists the registered models.
    """
    if not is_known(name):
        raise UsageError(f"unknown model {name!r} (choose one of: {', '.join(sorted(models.MODELS))})")


def build(name: str, *, num_classes: int, input_shape: tuple[int, int, int],
          seed: int = 0) -> models.Classifier | usermodel.UserModel:
    """Build model `name` (registered, or a user's reference) with seeded weights."""
    if is_reference(name):
        return usermodel.build(name, num_classes=num_classes, input_shape=input_shape, seed=seed)
    return models.build(name, num_classes=num_classes, input_shape=input_shape, seed=seed)
