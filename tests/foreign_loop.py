"""A TF2 training loop that is not this project's: its own model, optimizer, moving averages and keys.

Nothing here uses the project. It keeps a `tf.train.Checkpoint(net=..., optimizer=..., averages=...,
step=...)` under a `tf.train.CheckpointManager` with `max_to_keep=2`, and after every save writes
the accuracy of that checkpoint's averaged and raw weights on the validation split to a JSON-lines
file: the reference the evaluator's numbers are compared with.

    python -m tests.foreign_loop WORKDIR VALIDATION.npz TRAIN.npz REFS.jsonl [--steps N] [--save-every K]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("workdir", "validation", "train", "refs"):
        p.add_argument(name, type=Path)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--save-every", type=int, default=10)
    args = p.parse_args()
    train, val = np.load(args.train), np.load(args.validation)
    net = Net()
    names = {"fc1/kernel": net.fc1.kernel, "fc1/bias": net.fc1.bias, "fc2/kernel": net.fc2.kernel,
             "fc2/bias": net.fc2.bias}
    averages = {layer: {attr: tf.Variable(getattr(getattr(net, layer), attr)) for attr in ("kernel", "bias")}
                for layer in ("fc1", "fc2")}
    optimizer = Momentum(names)
    step = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(net=net, optimizer=optimizer, averages=averages, step=step)
    manager = tf.train.CheckpointManager(ckpt, str(args.workdir), max_to_keep=2)
    rng = np.random.default_rng(0)
    with args.refs.open("w") as refs:
        for _ in range(args.steps):
            batch = rng.choice(len(train["labels"]), 32, replace=False)
            x = tf.cast(train["images"][batch], tf.float32) / 255.0
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    train["labels"][batch], net(x)))
            optimizer.apply(tape.gradient(loss, list(names.values())), names)
            for key, var in names.items():
                layer, attr = key.split("/")
                averages[layer][attr].assign(DECAY * averages[layer][attr] + (1 - DECAY) * var)
            step.assign_add(1)
            if int(step) % args.save_every == 0:
                path = manager.save(checkpoint_number=int(step))
                raw = {k: v.numpy() for k, v in names.items()}
                ema = {f"{layer}/{attr}": v.numpy() for layer, d in averages.items() for attr, v in d.items()}
                refs.write(json.dumps({"checkpoint": Path(path).name, "step": int(step),
                                       "ema": accuracy(ema, val["images"], val["labels"]),
                                       "raw": accuracy(raw, val["images"], val["labels"])}) + "\n")
                refs.flush()


if __name__ == "__main__":
    main()
