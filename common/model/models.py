"""The tutorial models, built from plain `tf.Module`s so that every variable has a readable key.

A model's layers are attributes named after the layer (`conv1`, `fc1`, ...), and its
`named_variables()` maps each variable's attribute path (`conv1/kernel`, at any depth) to it.
Checkpoints store `as_tree(named_variables())` under `model/`, so the keys are `model/conv1/kernel`,
`model/conv1/bias`, ... A model is built for a dataset's `InputSpec.shape` and class count, and
takes the float inputs that the dataset's `Preprocessing` makes. Variables are created in the
constructor: build a model inside `strategy.scope()` and its variables are distributed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import tensorflow as tf

from common.errors import UsageError


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
    """size x size 'SAME' convolution, ReLU, then 2x2 max-pooling, as in the tutorial's CNN."""

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


Tree = dict[str, "tf.Variable | Tree"]


def as_tree(named: dict[str, tf.Variable]) -> Tree:
    """Nest `{"block1/conv/kernel": v}` as `{"block1": {"conv": {"kernel": v}}}`, the shape checkpoints key by.

    Paths may have any depth. Raises ValueError when one path is a prefix of another (a variable
    and a folder of variables cannot share a key).
    """
    tree: Tree = {}
    for path, var in named.items():
        *folders, leaf = path.split("/")
        node = tree
        for part in folders:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"variable path {path!r} runs through the variable {part!r}")
            node = child
        if leaf in node:
            raise ValueError(f"variable path {path!r} is used twice, or also as a folder")
        node[leaf] = var
    return tree


def tree_get(tree: Tree, path: str) -> tf.Variable:
    """The variable at `path` (`block1/conv/kernel`) of a tree made by `as_tree`."""
    node: tf.Variable | Tree = tree
    for part in path.split("/"):
        assert isinstance(node, dict)
        node = node[part]
    assert not isinstance(node, dict)
    return node


def module_variables(module: tf.Module) -> dict[str, tf.Variable]:
    """Map each variable of `module` to its attribute path (`conv1/kernel`), at any depth, in creation order.

    Attributes are walked in the order they were set (`tf.Module.variables` sorts them by name), so
    messages list a layer's kernel before its bias. Each variable appears once, under its first path.
    """
    found: dict[str, tf.Variable] = {}
    seen: set[int] = set()

    def walk(value: object, path: str) -> None:
        if isinstance(value, tf.Variable):
            if id(value) not in seen:
                seen.add(id(value))
                found[path] = value
        elif isinstance(value, tf.Module):
            ignored: frozenset[str] = getattr(value, "_TF_MODULE_IGNORED_PROPERTIES", frozenset())
            for name, child in vars(value).items():
                if name not in ignored:
                    walk(child, f"{path}/{name}" if path else name)
        elif isinstance(value, dict):
            for key, child in value.items():
                walk(child, f"{path}/{key}" if path else str(key))
        elif isinstance(value, (list, tuple)):
            for i, child in enumerate(value):
                walk(child, f"{path}/{i}" if path else str(i))

    walk(module, "")
    return found


class Classifier(tf.Module):
    """A stack of named layers mapping float images `[N, H, W, C]` to logits `[N, num_classes]`."""

    def __init__(self, name: str, layers: dict[str, tf.Module], *, flatten_before: str, num_classes: int,
                 input_shape: tuple[int, int, int]) -> None:
        super().__init__(name=name)
        self.layer_names = tuple(layers)
        for layer_name, layer in layers.items():
            setattr(self, layer_name, layer)  # the attribute name is the checkpoint key
        self.flatten_before = flatten_before
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)

    def layer(self, name: str) -> tf.Module:
        """Return the layer called `name`."""
        return getattr(self, name)

    def named_variables(self) -> dict[str, tf.Variable]:
        """Map `layer/path` (e.g. `conv1/kernel`) to each variable, in layer order."""
        return {f"{layer_name}/{path}": var for layer_name in self.layer_names
                for path, var in module_variables(self.layer(layer_name)).items()}

    def __call__(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        """Logits for `images`; `training` is for models whose layers behave differently then (batch norm)."""
        x = images
        for layer_name in self.layer_names:
            if layer_name == self.flatten_before:
                x = tf.reshape(x, [-1, math.prod(x.shape[1:])])
            x = self.layer(layer_name)(x)
        return x


ModelFn = Callable[[int, tuple[int, int, int], int], Classifier]
MODELS: dict[str, ModelFn] = {}


def register(name: str) -> Callable[[ModelFn], ModelFn]:
    """Register a model builder `fn(num_classes, input_shape, seed) -> Classifier` under `name`."""

    def wrap(fn: ModelFn) -> ModelFn:
        MODELS[name] = fn
        return fn

    return wrap


def _seeds(seed: int, n: int) -> list[tuple[int, int]]:
    return [(seed, i) for i in range(n)]


@register("softmax")
def softmax(num_classes: int, input_shape: tuple[int, int, int], seed: int) -> Classifier:
    """Multinomial logistic regression: pixels (784 for MNIST) -> classes."""
    (s1,) = _seeds(seed, 1)
    return Classifier("softmax", {"fc1": Dense(math.prod(input_shape), num_classes, seed=s1, relu=False, name="fc1")},
                      flatten_before="fc1", num_classes=num_classes, input_shape=input_shape)


@register("mlp")
def mlp(num_classes: int, input_shape: tuple[int, int, int], seed: int) -> Classifier:
    """One hidden layer: pixels (784 for MNIST) -> 500 (ReLU) -> classes."""
    s1, s2 = _seeds(seed, 2)
    return Classifier("mlp", {
        "fc1": Dense(math.prod(input_shape), 500, seed=s1, relu=True, name="fc1"),
        "fc2": Dense(500, num_classes, seed=s2, relu=False, name="fc2"),
    }, flatten_before="fc1", num_classes=num_classes, input_shape=input_shape)


def _two_conv(name: str, num_classes: int, input_shape: tuple[int, int, int], seed: int, *, size: int,
              filters: tuple[int, int]) -> Classifier:
    """conv size x size x filters[0], pool, conv size x size x filters[1], pool, dense 128, dense classes."""
    s1, s2, s3, s4 = _seeds(seed, 4)
    height, width, channels = input_shape
    pooled = math.ceil(math.ceil(height / 2) / 2) * math.ceil(math.ceil(width / 2) / 2)  # two 'SAME' 2x2 pools
    return Classifier(name, {
        "conv1": Conv(channels, filters[0], size=size, seed=s1, name="conv1"),
        "conv2": Conv(filters[0], filters[1], size=size, seed=s2, name="conv2"),
        "fc1": Dense(pooled * filters[1], 128, seed=s3, relu=True, name="fc1"),
        "fc2": Dense(128, num_classes, seed=s4, relu=False, name="fc2"),
    }, flatten_before="fc1", num_classes=num_classes, input_shape=input_shape)


@register("cnn")
def cnn(num_classes: int, input_shape: tuple[int, int, int], seed: int) -> Classifier:
    """The tutorial CNN: conv 5x5x16, pool, conv 5x5x36, pool, dense 128, dense classes."""
    return _two_conv("cnn", num_classes, input_shape, seed, size=5, filters=(16, 36))


@register("cnn3x3")
def cnn3x3(num_classes: int, input_shape: tuple[int, int, int], seed: int) -> Classifier:
    """The tutorial CNN with 3x3 kernels and 96 filters in conv2: conv 3x3x16, pool, conv 3x3x96, pool, dense 128.

    About as fast as `cnn` on CPUs: oneDNN works on channels in blocks of 16 (so 36 filters cost
    about as much as 48), and a 3x3 kernel has 9 weights per channel pair against 25.
    """
    return _two_conv("cnn3x3", num_classes, input_shape, seed, size=3, filters=(16, 96))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a model trains where the flags and run.json say nothing (`--steps`, `--label-smoothing`)."""

    steps: int = 10_000
    label_smoothing: float = 0.0


# cnn3x3 reaches its accuracy in 9,000 steps, in the time `cnn` takes for 10,000 (docs/performance.md).
_RECIPES = {"cnn3x3": Recipe(steps=9_000, label_smoothing=0.1)}


def recipe(name: str) -> Recipe:
    """Model `name`'s recipe; the plain one for the tutorial models and a user's own."""
    return _RECIPES.get(name, Recipe())


def build(name: str, *, num_classes: int, input_shape: tuple[int, int, int], seed: int = 0) -> Classifier:
    """Build registered model `name` for `num_classes` classes and images of `input_shape` (H, W, C), seeded.

    A user's `module.path:function` is built by `common.model.registry.build`, which chooses.
    """
    try:
        fn = MODELS[name]
    except KeyError:
        raise UsageError(f"unknown model {name!r} (choose one of: {', '.join(sorted(MODELS))})") from None
    height, width, channels = input_shape
    return fn(num_classes, (height, width, channels), seed)
