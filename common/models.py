"""The tutorial models, built from plain `tf.Module`s so that every variable has a readable key.

A model's layers are attributes named after the layer (`conv1`, `fc1`, ...), so a
`tf.train.Checkpoint(model=model)` stores `model/conv1/kernel`, `model/conv1/bias`, ...
Variables are created in the constructor: build a model inside `strategy.scope()` and its
variables are distributed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import tensorflow as tf

from common.errors import UsageError

IMAGE_PIXELS = 28 * 28


def _glorot_uniform(shape: list[int], fan_in: int, fan_out: int, seed: tuple[int, int]) -> tf.Tensor:
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return tf.random.stateless_uniform(shape, seed=seed, minval=-limit, maxval=limit)


class Dense(tf.Module):
    """`y = act(x @ kernel + bias)`."""

    def __init__(self, n_in: int, n_out: int, *, seed: tuple[int, int], relu: bool, name: str) -> None:
        super().__init__(name=name)
        self.kernel = tf.Variable(_glorot_uniform([n_in, n_out], n_in, n_out, seed), name="kernel")
        self.bias = tf.Variable(tf.zeros([n_out]), name="bias")
        self.relu = relu

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        y = tf.matmul(x, self.kernel) + self.bias
        return tf.nn.relu(y) if self.relu else y


class Conv(tf.Module):
    """5x5 'SAME' convolution, ReLU, then 2x2 max-pooling, as in the tutorial's CNN."""

    def __init__(self, n_in: int, n_out: int, *, size: int, seed: tuple[int, int], name: str) -> None:
        super().__init__(name=name)
        shape = [size, size, n_in, n_out]
        self.kernel = tf.Variable(
            _glorot_uniform(shape, size * size * n_in, size * size * n_out, seed), name="kernel"
        )
        self.bias = tf.Variable(tf.zeros([n_out]), name="bias")

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        y = tf.nn.relu(tf.nn.conv2d(x, self.kernel, strides=1, padding="SAME") + self.bias)
        return tf.nn.max_pool2d(y, ksize=2, strides=2, padding="SAME")


def as_tree(named: dict[str, tf.Variable]) -> dict[str, dict[str, tf.Variable]]:
    """Nest `{"conv1/kernel": v}` as `{"conv1": {"kernel": v}}`, the shape checkpoints key by."""
    tree: dict[str, dict[str, tf.Variable]] = {}
    for path, var in named.items():
        layer, attr = path.split("/")
        tree.setdefault(layer, {})[attr] = var
    return tree


class Classifier(tf.Module):
    """A stack of named layers mapping float images [N, 28, 28] in [0, 1] to logits [N, classes]."""

    def __init__(self, name: str, layers: dict[str, tf.Module], *, flatten_before: str) -> None:
        super().__init__(name=name)
        self.layer_names = tuple(layers)
        for layer_name, layer in layers.items():
            setattr(self, layer_name, layer)  # the attribute name is the checkpoint key
        self.flatten_before = flatten_before

    def layer(self, name: str) -> tf.Module:
        """Return the layer called `name`."""
        return getattr(self, name)

    def named_variables(self) -> dict[str, tf.Variable]:
        """Map `layer/var` (e.g. `conv1/kernel`) to each variable, in layer order."""
        return {
            f"{layer_name}/{attr}": getattr(self.layer(layer_name), attr)
            for layer_name in self.layer_names
            for attr in ("kernel", "bias")
        }

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        x = images[..., tf.newaxis]
        for layer_name in self.layer_names:
            if layer_name == self.flatten_before:
                x = tf.reshape(x, [-1, math.prod(x.shape[1:])])
            x = self.layer(layer_name)(x)
        return x


ModelFn = Callable[[int, int], Classifier]
MODELS: dict[str, ModelFn] = {}


def register(name: str) -> Callable[[ModelFn], ModelFn]:
    """Register a model builder `fn(num_classes, seed) -> Classifier` under `name`."""

    def wrap(fn: ModelFn) -> ModelFn:
        MODELS[name] = fn
        return fn

    return wrap


def _seeds(seed: int, n: int) -> list[tuple[int, int]]:
    return [(seed, i) for i in range(n)]


@register("softmax")
def softmax(num_classes: int, seed: int) -> Classifier:
    """Multinomial logistic regression: 784 -> classes."""
    (s1,) = _seeds(seed, 1)
    return Classifier("softmax", {"fc1": Dense(IMAGE_PIXELS, num_classes, seed=s1, relu=False, name="fc1")},
                      flatten_before="fc1")


@register("mlp")
def mlp(num_classes: int, seed: int) -> Classifier:
    """One hidden layer: 784 -> 500 (ReLU) -> classes."""
    s1, s2 = _seeds(seed, 2)
    return Classifier("mlp", {
        "fc1": Dense(IMAGE_PIXELS, 500, seed=s1, relu=True, name="fc1"),
        "fc2": Dense(500, num_classes, seed=s2, relu=False, name="fc2"),
    }, flatten_before="fc1")


@register("cnn")
def cnn(num_classes: int, seed: int) -> Classifier:
    """The tutorial CNN: conv 5x5x16, pool, conv 5x5x36, pool, dense 128, dense classes."""
    s1, s2, s3, s4 = _seeds(seed, 4)
    return Classifier("cnn", {
        "conv1": Conv(1, 16, size=5, seed=s1, name="conv1"),
        "conv2": Conv(16, 36, size=5, seed=s2, name="conv2"),
        "fc1": Dense(7 * 7 * 36, 128, seed=s3, relu=True, name="fc1"),
        "fc2": Dense(128, num_classes, seed=s4, relu=False, name="fc2"),
    }, flatten_before="fc1")


def build(name: str, *, num_classes: int = 10, seed: int = 0) -> Classifier:
    """Build model `name` with fresh, seeded weights."""
    try:
        fn = MODELS[name]
    except KeyError:
        raise UsageError(f"unknown model {name!r} (choose one of: {', '.join(sorted(MODELS))})") from None
    return fn(num_classes, seed)
