"""A trainer and an evaluation script written the TF1 tutorials' way (mnist_train.py, mnist_eval.py).

Nothing here uses the project: placeholders, `variable_scope` layers, `ExponentialMovingAverage.apply`,
a `tf.compat.v1.train.Saver` with `global_step` and the default `max_to_keep=5`; the evaluation
rebuilds the graph and restores through `variables_to_restore()`. Run as a script it trains, and
after every save evaluates the checkpoint just written (EMA and raw weights) into a JSON-lines file:
the reference the evaluator's numbers are compared with.

    python -m tests.tf1_tutorial WORKDIR DATA_DIR REFS.jsonl VALIDATION.npz [--steps N] [--save-every K]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

v1 = tf.compat.v1
INPUT_NODE, HIDDEN, OUTPUT_NODE = 784, 30, 10
MOVING_AVERAGE_DECAY = 0.99
LEARNING_RATE = 0.5
BATCH_SIZE = 32
MODEL_NAME = "mnist_classify.ckpt"


def read_idx(path: Path) -> np.ndarray:
    """The array of an IDX file (gzipped or not), as the tutorials' input_data read it."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def inference(x: tf.Tensor) -> tf.Tensor:
    """mnist_inference.py: two fully connected layers under variable scopes layer1 and layer2."""
    def layer(name: str, inputs: tf.Tensor, n_in: int, n_out: int) -> tf.Tensor:
        with v1.variable_scope(name):
            weights = v1.get_variable("weights", [n_in, n_out], initializer=v1.truncated_normal_initializer(stddev=0.1))
            biases = v1.get_variable("biases", [n_out], initializer=v1.constant_initializer(0.0))
            return tf.matmul(inputs, weights) + biases

    return layer("layer2", tf.nn.relu(layer("layer1", x, INPUT_NODE, HIDDEN)), HIDDEN, OUTPUT_NODE)


def train(workdir: Path, data_dir: Path, *, steps: int, save_every: int, ema: bool = True,
          after_save: object = None) -> None:
    """mnist_train.py: SGD on the training images, a checkpoint every `save_every` steps."""
    images = read_idx(next(data_dir.glob("train-images*"))).reshape(-1, INPUT_NODE).astype(np.float32) / 255.0
    labels = read_idx(next(data_dir.glob("train-labels*"))).astype(np.int64)
    with tf.Graph().as_default():
        x = v1.placeholder(tf.float32, [None, INPUT_NODE], name="x-input")
        y_ = v1.placeholder(tf.int64, [None], name="y-input")
        y = inference(x)
        global_step = tf.Variable(0, trainable=False, name="global_step")
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y_, logits=y))
        train_step = v1.train.GradientDescentOptimizer(LEARNING_RATE).minimize(loss, global_step=global_step)
        if ema:
            averages = v1.train.ExponentialMovingAverage(MOVING_AVERAGE_DECAY, global_step)
            with tf.control_dependencies([train_step, averages.apply(v1.trainable_variables())]):
                train_step = tf.no_op(name="train")
        saver = v1.train.Saver()
        rng = np.random.default_rng(0)
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            for i in range(1, steps + 1):
                batch = rng.integers(0, len(labels), BATCH_SIZE)
                _, step = sess.run([train_step, global_step], {x: images[batch], y_: labels[batch]})
                if i % save_every == 0:
                    path = saver.save(sess, str(workdir.resolve() / MODEL_NAME), global_step=global_step)
                    if callable(after_save):
                        after_save(path, step)


def evaluate(checkpoint: str, images: np.ndarray, labels: np.ndarray, *, ema: bool = True) -> dict[str, object]:
    """mnist_eval.py: rebuild the graph, restore (through variables_to_restore() for EMA), measure accuracy."""
    with tf.Graph().as_default():
        x = v1.placeholder(tf.float32, [None, INPUT_NODE], name="x-input")
        y = inference(x)
        if ema:
            saver = v1.train.Saver(v1.train.ExponentialMovingAverage(MOVING_AVERAGE_DECAY).variables_to_restore())
        else:
            saver = v1.train.Saver(v1.trainable_variables())
        with v1.Session() as sess:
            saver.restore(sess, checkpoint)
            logits = sess.run(y, {x: images.reshape(-1, INPUT_NODE).astype(np.float32) / 255.0})
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return {"accuracy": float(np.mean(np.argmax(logits, axis=1) == labels)), "probabilities": probabilities}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    for name in ("workdir", "data_dir", "refs", "validation"):
        p.add_argument(name, type=Path)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--save-every", type=int, default=10)
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    with np.load(args.validation) as f:
        images, labels = f["images"], f["labels"]

    def reference(path: str, step: int) -> None:
        row = {"checkpoint": Path(path).name,
               "ema": evaluate(path, images, labels)["accuracy"],
               "raw": evaluate(path, images, labels, ema=False)["accuracy"]}
        with open(args.refs, "a") as out:
            out.write(json.dumps(row) + "\n")

    train(args.workdir, args.data_dir, steps=args.steps, save_every=args.save_every, after_save=reference)


if __name__ == "__main__":
    main(sys.argv[1:])
