"""`--model module.path:function`: a user's own model, wrapped to look like the built-in ones.

The function is called as `function(num_classes, input_shape)` with `input_shape = (height, width,
channels)` and returns a Keras 3 model or a `tf.Module` mapping float images `[N, H, W, C]` to
logits `[N, num_classes]`. `UserModel` gives it the surface the programs use (`named_variables()`
with readable paths, `num_classes`, `input_shape`, a call): a Keras variable's key is its own
`path` (`dense/kernel`), a `tf.Module` variable's key is its attribute path (`block/conv/kernel`),
so checkpoints hold `model/dense/kernel` and `ema/dense/kernel`. Non-trainable variables (batch
norm's moving statistics) are saved and restored with the raw weights and have no EMA shadow.
"""

from __future__ import annotations

import sys
from typing import Any

import tensorflow as tf

from common.errors import UsageError
from common.model.models import Classifier, as_tree, module_variables
from common.reference import first_line, import_function


def _is_keras(obj: Any) -> bool:
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(obj, keras.Model)


class UserModel(Classifier):
    """A user's Keras model or `tf.Module`, with the surface of the built-in `Classifier`."""

    def __init__(self, net: Any, *, reference: str, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__(reference.partition(":")[2], {}, flatten_before="", num_classes=num_classes,
                         input_shape=input_shape)
        self.net = net
        self.is_keras = _is_keras(net)

    def named_variables(self) -> dict[str, tf.Variable]:
        """Map each variable's path (`dense/kernel`, `block/conv/kernel`) to the `tf.Variable` that holds it."""
        if self.is_keras:
            # A Keras 3 variable wraps a tf.Variable (`.value`) of the same trainability.
            return {v.path: v.value for v in self.net.variables}
        return module_variables(self.net)

    def __call__(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        if self.is_keras:
            return self.net(images, training=training)
        return self.net(images)


def build(reference: str, *, num_classes: int, input_shape: tuple[int, int, int], seed: int = 0) -> UserModel:
    """Import and call `reference`, check what it returns, and wrap it.

    Keras' layer names restart and its global seeds are set to `seed` first, so the variable paths
    are the same in every program and the initial weights follow `--seed`.

    Raises:
      UsageError: the function cannot be imported, raises, or returns something that is not a
        Keras model or `tf.Module` with trainable variables mapping `[1, *input_shape]` to
        `[1, num_classes]`.
    """
    function = import_function(reference)
    import keras

    _restart_layer_names()
    keras.utils.set_random_seed(seed)
    try:
        net = function(num_classes, tuple(input_shape))
    except Exception as e:  # the user's code may raise anything; it becomes one line, exit 2
        raise UsageError(f"--model {reference}: the function raised {type(e).__name__}: {first_line(e)}") from None
    if not (_is_keras(net) or isinstance(net, tf.Module)):
        raise UsageError(f"--model {reference}: returned a {type(net).__name__}, not a Keras model or tf.Module")
    model = UserModel(net, reference=reference, num_classes=num_classes, input_shape=input_shape)
    if not model.is_keras:  # a Keras model without an Input makes its variables in the first call
        _check_trainable(model, reference)
    _check_outputs(model, reference)
    _check_trainable(model, reference)
    _check_paths(model, reference)
    return model


def _restart_layer_names() -> None:
    """Restart Keras' count of unnamed layers, so that every program, and every model built in one, gets the same keys.

    Keras names unnamed layers per process (`dense`, then `dense_1`) and the names are the variable
    paths, i.e. the checkpoint keys. `keras.backend.clear_session()` restarts the count too, but it
    also resets TensorFlow's default graph, which breaks an open `strategy.scope()`.
    """
    from keras.src.utils import naming  # Keras 3 exports no other way to reset only the count

    naming.reset_uids()


def _check_trainable(model: UserModel, reference: str) -> None:
    if not any(v.trainable for v in model.named_variables().values()):
        raise UsageError(f"--model {reference}: the model has no trainable variables")


def _check_paths(model: UserModel, reference: str) -> None:
    """Each variable needs its own path, which no other path runs through: the paths are the checkpoint keys."""
    paths = [v.path for v in model.net.variables] if model.is_keras else list(model.named_variables())
    shared = sorted({p for p in paths if paths.count(p) > 1})
    if shared:
        raise UsageError(f"--model {reference}: several variables have the path {shared[0]}; give their layers "
                         "distinct names")
    try:
        as_tree(model.named_variables())
    except ValueError as e:
        raise UsageError(f"--model {reference}: {e}") from None


def _check_outputs(model: UserModel, reference: str) -> None:
    """Call the model once on zeros (which also builds a Keras model without an Input); check the logits' shape."""
    try:
        logits = model(tf.zeros([1, *model.input_shape]))
    except Exception as e:  # as above: the user's call may raise anything
        raise UsageError(f"--model {reference}: calling it on a [1, {', '.join(map(str, model.input_shape))}] "
                         f"batch raised {type(e).__name__}: {first_line(e)}") from None
    shape = tuple(getattr(logits, "shape", ()))
    if shape != (1, model.num_classes):
        raise UsageError(f"--model {reference}: returns outputs of shape {list(shape)} for one image, expected "
                         f"[1, {model.num_classes}] (one logit per class)")
