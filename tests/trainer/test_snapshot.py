from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from trainer import snapshot


def _read_all(prefix: Path) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(prefix))
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()}


def test_a_snapshot_keeps_its_values_while_training_updates_the_variables_in_place(tmp_path: Path) -> None:
    """Written after in-place updates (Adam's fused op, assign_add), a snapshot holds the values it was taken with."""
    weights = tf.Variable(tf.random.stateless_normal([64, 32], seed=[1, 2]))
    m, v = tf.Variable(tf.zeros([64, 32])), tf.Variable(tf.zeros([64, 32]))
    step = tf.Variable(7, dtype=tf.int64)
    checkpoint = tf.train.Checkpoint(model=tf.Module(), weights=weights, m=m, v=v, step=step)
    checkpoint.write(str(tmp_path / "sync"))  # what a sync save at this point writes

    taken = snapshot.take(checkpoint)
    for _ in range(3):  # the kernels update in place, as the training step's do
        tf.raw_ops.ResourceApplyAdam(var=weights.handle, m=m.handle, v=v.handle, beta1_power=0.9, beta2_power=0.99,
                                     lr=0.1, beta1=0.9, beta2=0.999, epsilon=1e-7, grad=tf.ones([64, 32]))
        step.assign_add(1)
    taken.write(str(tmp_path / "async"))

    written, expected = _read_all(tmp_path / "async"), _read_all(tmp_path / "sync")
    assert sorted(written) == sorted(expected) and sorted(written) == taken.keys()
    for key, value in expected.items():
        if key != "_CHECKPOINTABLE_OBJECT_GRAPH":
            np.testing.assert_array_equal(written[key], value, err_msg=key)
    kernel = expected["weights/.ATTRIBUTES/VARIABLE_VALUE"]
    assert int(step.numpy()) == 10 and not np.array_equal(weights.numpy(), kernel)
    restored = tf.Variable(tf.zeros([64, 32]))
    tf.train.Checkpoint(weights=restored).read(str(tmp_path / "async")).expect_partial()
    np.testing.assert_array_equal(restored.numpy(), kernel)
