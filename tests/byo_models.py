"""Users' models and data for the tests: `--model tests.byo_models:NAME`, `--dataset tests.byo_models:NAME`,
and folders and .npz files written for `--dataset folder:` and `npz:`."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from PIL import Image


def keras_bn(num_classes: int, input_shape: tuple[int, int, int]) -> Any:
    """A Keras 3 functional model with batch norm: conv, BN, ReLU, flatten, dense."""
    import keras

    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs)


def keras_sequential(num_classes: int, input_shape: tuple[int, int, int]) -> Any:
    """Unnamed layers and no Input: Keras names them and makes their variables at the first call."""
    import keras

    return keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(8, activation="relu"),
                             keras.layers.Dense(num_classes)])


def same_names(num_classes: int, input_shape: tuple[int, int, int]) -> Any:
    """A subclassed Keras model with two layers named alike: their variables would share checkpoint keys."""
    import keras

    class Twins(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.flatten = keras.layers.Flatten()
            self.first = keras.layers.Dense(4, name="fc")
            self.second = keras.layers.Dense(num_classes, name="fc")

        def call(self, x: Any) -> Any:
            return self.second(self.first(self.flatten(x)))

    return Twins()


class _Linear(tf.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.kernel = tf.Variable(tf.random.normal([n_in, n_out], stddev=0.05))
        self.bias = tf.Variable(tf.zeros([n_out]))

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return x @ self.kernel + self.bias


class _Nest(tf.Module):
    """Holds `inner` under the attribute `name` and calls it: one more level of variable path."""

    def __init__(self, name: str, inner: tf.Module) -> None:
        super().__init__()
        self.inner_name = name
        setattr(self, name, inner)

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return getattr(self, self.inner_name)(x)


class NestedModule(tf.Module):
    """Variables three modules deep: `encoder/block/proj/kernel`."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.size = int(np.prod(input_shape))
        self.encoder = _Nest("block", _Nest("proj", _Linear(self.size, num_classes)))

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        return self.encoder(tf.reshape(images, [-1, self.size]))


def nested_module(num_classes: int, input_shape: tuple[int, int, int]) -> NestedModule:
    return NestedModule(num_classes, input_shape)


def raises(num_classes: int, input_shape: tuple[int, int, int]) -> Any:
    raise RuntimeError("no model today")


def no_variables(num_classes: int, input_shape: tuple[int, int, int]) -> Any:
    return tf.Module()


def wrong_outputs(num_classes: int, input_shape: tuple[int, int, int]) -> Any:
    import keras

    inputs = keras.Input(input_shape)
    return keras.Model(inputs, keras.layers.Dense(num_classes + 1)(keras.layers.Flatten()(inputs)))


def bar_images(n: int, *, classes: int, size: int, seed: int, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Noisy `size`x`size` images whose class is a bright bar at a class-dependent row."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = (rng.random((n, size, size)) * 80).astype(np.uint8)
    step = size // classes
    for i, label in enumerate(labels):
        images[i, label * step:label * step + max(1, step // 2), :] = 255
    if channels == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    return images, labels.astype(np.int64)


def make_data() -> dict[str, Any]:
    """A dataset function: a batched tf.data training split, array test split, three named classes."""
    x, y = bar_images(240, classes=3, size=8, seed=3)
    xt, yt = bar_images(60, classes=3, size=8, seed=4)
    return {"train": tf.data.Dataset.from_tensor_slices((x, y)).batch(50), "test": (xt, yt),
            "class_names": ["low", "mid", "high"], "preprocessing": {"scale": 1 / 255, "mean": 0.5, "std": 0.25}}


def broken_data() -> dict[str, Any]:
    raise ValueError("the data server is down")


CLASSES = ("cat", "dog", "emu")


def write_folder(root: Path, *, n_train: int = 120, n_test: int = 30, test: bool = True) -> Path:
    """Class subfolders of RGB PNGs of mixed sizes (12x12 and 10x14), and a test/ folder."""
    splits = [("", n_train, 0)] + ([("test", n_test, 1)] if test else [])
    for split, n, seed in splits:
        x, y = bar_images(n, classes=len(CLASSES), size=12, seed=seed, channels=3)
        for i, (image, label) in enumerate(zip(x, y, strict=True)):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            picture = Image.fromarray(image)
            (picture if i % 2 else picture.resize((14, 10))).save(folder / f"{i:04d}.png")
    return root


def write_npz(path: Path, **drop: bool) -> Path:
    """A `keras.datasets`-style .npz of 8x8 grey images in four classes; `x_train=True` leaves that array out."""
    x, y = bar_images(200, classes=4, size=8, seed=5)
    xt, yt = bar_images(40, classes=4, size=8, seed=6)
    arrays = {"x_train": x, "y_train": y, "x_test": xt, "y_test": yt}
    np.savez(path, **{k: v for k, v in arrays.items() if not drop.get(k)})
    return path


def keras_mlp(num_classes: int, input_shape: tuple[int, int, int]) -> Any:
    """The `mlp` in Keras 3 (784 -> 500 ReLU -> classes), as another training loop would define it."""
    import keras

    inputs = keras.Input(input_shape)
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(500, activation="relu", name="fc1")(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="fc2")(x))


class SlowEval(tf.Module):
    """A linear model whose every batch of more than one image takes SLOW_EVAL_SECS seconds more (read when it is
    built): set for an evaluator, it is slow to evaluate, so that a test can kill it in the middle of an evaluation."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.size = int(np.prod(input_shape))
        self.linear = _Linear(self.size, num_classes)
        self.pause = float(os.environ.get("SLOW_EVAL_SECS", "0"))

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        logits = self.linear(tf.reshape(images, [-1, self.size]))
        if not self.pause:
            return logits
        waited = tf.py_function(self._wait, [tf.shape(images)[0]], tf.float32)
        return logits + 0.0 * waited

    def _wait(self, batch: tf.Tensor) -> float:
        if int(batch) > 1:
            time.sleep(self.pause)
        return 0.0


def slow_eval(num_classes: int, input_shape: tuple[int, int, int]) -> SlowEval:
    return SlowEval(num_classes, input_shape)
