from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from common.checkpoint import checkpoints
from common.errors import UsageError
from common.model import models
from common.model.ema import MovingAverage, raw_variables, variables_to_restore
from tests.helpers import mnist_model


@pytest.mark.parametrize(("name", "params"), [
    ("softmax", 784 * 10 + 10),
    ("mlp", 784 * 500 + 500 + 500 * 10 + 10),
    ("cnn", 5 * 5 * 16 + 16 + 5 * 5 * 16 * 36 + 36 + 1764 * 128 + 128 + 128 * 10 + 10),
    ("cnn3x3", 3 * 3 * 16 + 16 + 3 * 3 * 16 * 96 + 96 + 7 * 7 * 96 * 128 + 128 + 128 * 10 + 10),
])
def test_parameter_counts_and_output(name: str, params: int) -> None:
    model = mnist_model(name, seed=1)
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) == params
    assert model(tf.zeros([3, 28, 28, 1])).shape == (3, 10)


def test_seed_makes_weights_reproducible() -> None:
    a, b, c = mnist_model("mlp", seed=3), mnist_model("mlp", seed=3), mnist_model("mlp", seed=4)
    np.testing.assert_array_equal(a.fc1.kernel.numpy(), b.fc1.kernel.numpy())
    assert not np.array_equal(a.fc1.kernel.numpy(), c.fc1.kernel.numpy())


def test_unknown_model() -> None:
    with pytest.raises(UsageError, match="unknown model 'resnet' \\(choose one of: cnn, cnn3x3, mlp, softmax\\)"):
        models.build("resnet", num_classes=10, input_shape=(28, 28, 1))


def test_readable_checkpoint_keys(tmp_path: Path) -> None:
    model = mnist_model("cnn")
    ema = MovingAverage(model, decay=0.9)
    prefix = tf.train.Checkpoint(model=model, ema=ema.tree).write(str(tmp_path / "model-1"))
    keys = {k for k, _ in tf.train.list_variables(prefix)}
    for layer in ("conv1", "conv2", "fc1", "fc2"):
        for attr in ("kernel", "bias"):
            assert checkpoints.tensor_key(f"model/{layer}/{attr}") in keys
            assert checkpoints.tensor_key(f"ema/{layer}/{attr}") in keys


def test_ema_update_follows_warmup_formula() -> None:
    model = mnist_model("softmax")
    ema = MovingAverage(model, decay=0.999)
    start = model.fc1.bias.numpy().copy()
    model.fc1.bias.assign(start + 1.0)
    ema.update(tf.constant(0, tf.int64))  # decay = min(0.999, 1/10) = 0.1
    np.testing.assert_allclose(ema.shadows["fc1/bias"].numpy(), start + 0.9, rtol=1e-6)
    ema.update(tf.constant(10_000, tf.int64))  # decay = min(0.999, 10001/10010) = 0.999
    np.testing.assert_allclose(ema.shadows["fc1/bias"].numpy(), start + 0.9 + 0.001 * 0.1, rtol=1e-5)


def test_variables_to_restore_loads_shadows_into_model(tmp_path: Path) -> None:
    trained = mnist_model("mlp", seed=1)
    ema = MovingAverage(trained, decay=0.5)
    for var in trained.trainable_variables:
        var.assign_add(tf.ones_like(var))
    ema.update(tf.constant(100, tf.int64))
    prefix = tf.train.Checkpoint(model=trained, ema=ema.tree).write(str(tmp_path / "model-1"))

    fresh = mnist_model("mlp", seed=9)
    mapping = variables_to_restore(fresh)
    assert sorted(mapping) == ["ema/fc1/bias", "ema/fc1/kernel", "ema/fc2/bias", "ema/fc2/kernel"]
    checkpoints.restore_variables(prefix, mapping)
    np.testing.assert_array_equal(fresh.fc2.kernel.numpy(), ema.shadows["fc2/kernel"].numpy())
    assert not np.array_equal(fresh.fc2.kernel.numpy(), trained.fc2.kernel.numpy())

    checkpoints.restore_variables(prefix, raw_variables(fresh))
    np.testing.assert_array_equal(fresh.fc2.kernel.numpy(), trained.fc2.kernel.numpy())


def test_missing_shadows_fail_loudly(tmp_path: Path) -> None:
    model = mnist_model("softmax")
    prefix = tf.train.Checkpoint(model=model).write(str(tmp_path / "model-1"))
    before = model.fc1.kernel.numpy().copy()
    with pytest.raises(checkpoints.CheckpointError, match="no ema/fc1/kernel, ema/fc1/bias in the checkpoint"):
        checkpoints.restore_variables(prefix, variables_to_restore(model))
    np.testing.assert_array_equal(model.fc1.kernel.numpy(), before)


def test_shape_mismatch_lists_pairs(tmp_path: Path) -> None:
    prefix = tf.train.Checkpoint(model=mnist_model("mlp")).write(str(tmp_path / "model-1"))
    expected = r"shape mismatch: model/fc1/kernel \[784, 500\] != \[784, 10\]"
    with pytest.raises(checkpoints.CheckpointError, match=expected):
        checkpoints.restore_variables(prefix, raw_variables(mnist_model("softmax")))
