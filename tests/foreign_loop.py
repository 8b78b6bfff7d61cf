"""A TF2 training loop that is not this project's: its own model, optimizer, moving averages and keys.

Nothing here uses the project. It keeps a `tf.train.Checkpoint(net=..., optimizer=..., averages=...,
step=...)` of a plain `tf.Module` (or, with `--keras`, `tf.train.Checkpoint(model=..., optimizer=...,
ema=..., step=...)` of a Keras 3 model and optimizer) under a `tf.train.CheckpointManager` with
`max_to_keep=2`, and after every save writes the accuracy of that checkpoint's averaged and raw
weights on the validation split to a JSON-lines file: the reference the evaluator's numbers are
compared with.

    python -m tests.foreign_loop WORKDIR VALIDATION.npz TRAIN.npz REFS.jsonl [--steps N] [--save-every K] [--keras]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

HIDDEN, CLASSES, DECAY = 500, 10, 0.9


class Layer(tf.Module):
    def __init__(self, n_in: int, n_out: int, seed: int) -> None:
        super().__init__()
        self.kernel = tf.Variable(tf.random.stateless_normal([n_in, n_out], seed=[seed, 0], stddev=0.05))
        self.bias = tf.Variable(tf.zeros([n_out]))


class Net(tf.Module):
    """784 -> 500 (ReLU) -> 10, with its layers as `fc1` and `fc2`."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = Layer(784, HIDDEN, 1)
        self.fc2 = Layer(HIDDEN, CLASSES, 2)

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        hidden = tf.nn.relu(tf.matmul(tf.reshape(x, [-1, 784]), self.fc1.kernel) + self.fc1.bias)
        return tf.matmul(hidden, self.fc2.kernel) + self.fc2.bias


class Momentum(tf.Module):
    """SGD with momentum, its velocities kept by variable name."""

    def __init__(self, names: dict[str, tf.Variable], lr: float = 0.1, momentum: float = 0.9) -> None:
        super().__init__()
        self.lr, self.momentum = lr, momentum
        self.velocity = {k.replace("/", "_"): tf.Variable(tf.zeros_like(v)) for k, v in names.items()}

    def apply(self, grads: list[tf.Tensor], names: dict[str, tf.Variable]) -> None:
        for (key, var), grad in zip(names.items(), grads, strict=True):
            velocity = self.velocity[key.replace("/", "_")]
            velocity.assign(self.momentum * velocity + grad)
            var.assign_sub(self.lr * velocity)


def accuracy(weights: dict[str, np.ndarray], images: np.ndarray, labels: np.ndarray) -> float:
    """The tutorial's evaluation of weights `fc1/kernel`, ... on uint8 images."""
    x = tf.reshape(tf.cast(images, tf.float32) / 255.0, [-1, 784])
    hidden = tf.nn.relu(tf.matmul(x, weights["fc1/kernel"]) + weights["fc1/bias"])
    logits = tf.matmul(hidden, weights["fc2/kernel"]) + weights["fc2/bias"]
    return float(np.mean(np.argmax(logits.numpy(), axis=1) == labels))


def plain_loop() -> tuple[Any, dict[str, tf.Variable], dict[str, tf.Variable], Any, dict[str, Any]]:
    """The tf.Module net, its weights and their averages by name, an optimizer step, and the checkpoint's parts."""
    net = Net()
    names = {"fc1/kernel": net.fc1.kernel, "fc1/bias": net.fc1.bias, "fc2/kernel": net.fc2.kernel,
             "fc2/bias": net.fc2.bias}
    averages = {layer: {attr: tf.Variable(getattr(getattr(net, layer), attr)) for attr in ("kernel", "bias")}
                for layer in ("fc1", "fc2")}
    shadows = {f"{layer}/{attr}": v for layer, d in averages.items() for attr, v in d.items()}
    optimizer = Momentum(names)
    return net, names, shadows, lambda grads: optimizer.apply(grads, names), {
        "net": net, "optimizer": optimizer, "averages": averages}


def keras_loop() -> tuple[Any, dict[str, tf.Variable], dict[str, tf.Variable], Any, dict[str, Any]]:
    """The same with a Keras 3 model and optimizer; the averages are a dict keyed `fc1_kernel`, ..."""
    import keras

    from tests.byo_models import keras_mlp

    keras.utils.set_random_seed(0)
    model = keras_mlp(CLASSES, (28, 28, 1))
    names = {v.path: v for v in model.trainable_variables}
    averages = {k.replace("/", "_"): tf.Variable(v.numpy()) for k, v in names.items()}
    shadows = {k: averages[k.replace("/", "_")] for k in names}
    optimizer = keras.optimizers.Adam(1e-3)
    apply = lambda grads: optimizer.apply_gradients(zip(grads, list(names.values()), strict=True))  # noqa: E731
    return model, names, shadows, apply, {"model": model, "optimizer": optimizer, "ema": averages}


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("workdir", "validation", "train", "refs"):
        p.add_argument(name, type=Path)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--keras", action="store_true")
    p.add_argument("--pace", type=Path, help="a ledger: before each save, wait (up to 30 s) until it names the "
                                             "checkpoint that save deletes, so that a watching evaluator keeps up")
    args = p.parse_args()
    train, val = np.load(args.train), np.load(args.validation)
    net, names, shadows, apply, parts = keras_loop() if args.keras else plain_loop()
    step = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(**parts, step=step)
    manager = tf.train.CheckpointManager(ckpt, str(args.workdir), max_to_keep=2)
    rng = np.random.default_rng(0)
    with args.refs.open("w") as refs:
        for _ in range(args.steps):
            batch = rng.choice(len(train["labels"]), 32, replace=False)
            x = tf.cast(train["images"][batch][..., None], tf.float32) / 255.0
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    train["labels"][batch], net(x)))
            apply(tape.gradient(loss, list(names.values())))
            for key, var in names.items():
                shadows[key].assign(DECAY * shadows[key] + (1 - DECAY) * var)
            step.assign_add(1)
            if int(step) % args.save_every == 0:
                if args.pace is not None and int(step) > 2 * args.save_every:
                    _wait_for_row(args.pace, f"ckpt-{int(step) - 2 * args.save_every}")
                path = manager.save(checkpoint_number=int(step))
                raw = {k: v.numpy() for k, v in names.items()}
                ema = {k: v.numpy() for k, v in shadows.items()}
                refs.write(json.dumps({"checkpoint": Path(path).name, "step": int(step),
                                       "ema": accuracy(ema, val["images"], val["labels"]),
                                       "raw": accuracy(raw, val["images"], val["labels"])}) + "\n")
                refs.flush()


def _wait_for_row(ledger: Path, name: str, timeout: float = 30.0) -> None:
    """Wait until `ledger` has a row of checkpoint `name` (or the time is up: the test then says what is missing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ledger.exists() and f'"checkpoint": "{name}"' in ledger.read_text("utf-8", "replace"):
            return
        time.sleep(0.05)


if __name__ == "__main__":
    main()
