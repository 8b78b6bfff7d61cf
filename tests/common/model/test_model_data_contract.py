"""The model and data contract: input specs, preprocessing, and variable paths of any depth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from common.checkpoint import checkpoints
from common.data import datasets
from common.data.inputspec import InputSpec, Preprocessing
from common.errors import UsageError
from common.model import models
from common.model.ema import MovingAverage, raw_variables, variables_to_restore
from common.run.spec import RunSpec, read_run, write_run
from common.storage import open_storage
from trainer.step import Adam


class Deep(tf.Module):
    """Variables three levels deep, and one buffer that is not trained."""

    def __init__(self) -> None:
        super().__init__(name="deep")
        self.block = tf.Module()
        self.block.inner = tf.Module()
        self.block.inner.kernel = tf.Variable(tf.ones([3, 2]), name="kernel")
        self.block.inner.bias = tf.Variable(tf.zeros([2]), name="bias")
        self.block.count = tf.Variable(0.0, trainable=False, name="count")
        self.head = [tf.Variable(tf.ones([2]), name="scale")]

    def named_variables(self) -> dict[str, tf.Variable]:
        return models.module_variables(self)


def test_variable_paths_of_any_depth_in_creation_order() -> None:
    assert list(Deep().named_variables()) == ["block/inner/kernel", "block/inner/bias", "block/count", "head/0"]


def test_as_tree_nests_any_depth_and_refuses_a_clash() -> None:
    a, b = tf.Variable(1.0), tf.Variable(2.0)
    tree = models.as_tree({"x/y/z": a, "x/w": b})
    assert models.tree_get(tree, "x/y/z") is a and models.tree_get(tree, "x/w") is b
    with pytest.raises(ValueError, match="runs through the variable"):
        models.as_tree({"x": a, "x/y": b})
    with pytest.raises(ValueError, match="used twice, or also as a folder"):
        models.as_tree({"x/y": a, "x": b})


def test_deep_paths_give_readable_keys_for_weights_shadows_and_slots(tmp_path: Path) -> None:
    model = Deep()
    ema = MovingAverage(model, decay=0.9)  # type: ignore[arg-type]
    trainable = {k: v for k, v in model.named_variables().items() if v.trainable}
    optimizer = Adam(trainable)
    grads = [tf.ones_like(v) for v in trainable.values()]
    optimizer.apply(grads, list(trainable), list(trainable.values()), tf.constant(0.1))
    ema.update(tf.constant(100))
    prefix = tf.train.Checkpoint(model=models.as_tree(model.named_variables()), ema=ema.tree,
                                 optimizer=optimizer).write(str(tmp_path / "model-1"))
    keys = {name.split("/.ATTRIBUTES")[0] for name, _ in tf.train.list_variables(prefix)}
    assert {"model/block/inner/kernel", "model/block/count", "model/head/0", "ema/block/inner/kernel",
            "ema/head/0", "optimizer/m/block/inner/kernel", "optimizer/v/head/0"} <= keys
    assert "ema/block/count" not in keys  # only trained variables have shadows
    fresh = Deep()
    checkpoints.restore_variables(Path(prefix), variables_to_restore(fresh))  # type: ignore[arg-type]
    np.testing.assert_allclose(fresh.block.inner.kernel.numpy(), ema.shadows["block/inner/kernel"].numpy())
    checkpoints.restore_variables(Path(prefix), raw_variables(fresh))  # type: ignore[arg-type]
    np.testing.assert_allclose(fresh.block.inner.kernel.numpy(), model.block.inner.kernel.numpy())
    assert fresh.block.inner.kernel.numpy()[0, 0] != 1.0  # Adam moved it


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_models_take_any_image_size_and_channels(name: str) -> None:
    model = models.build(name, num_classes=5, input_shape=(32, 24, 3))
    assert model(tf.zeros([2, 32, 24, 3])).shape == (2, 5)
    assert model.num_classes == 5 and model.input_shape == (32, 24, 3)


def test_preprocessing_is_the_division_the_trainer_always_did() -> None:
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    spec = datasets.MNIST_INPUT
    out = datasets.MNIST_PREPROCESSING.apply(pixels, InputSpec(16, 16, 1)).numpy()
    assert out.shape == (1, 16, 16, 1) and spec.stored_shape == (28, 28)
    np.testing.assert_array_equal(out[..., 0], pixels.astype(np.float32) / np.float32(255))
    centred = Preprocessing(scale=1 / 255, mean=0.5, std=0.25).apply(pixels, InputSpec(16, 16, 1)).numpy()
    np.testing.assert_allclose(centred[..., 0], (pixels / 255 - 0.5) / 0.25, rtol=1e-6, atol=1e-6)
    rgb = np.zeros((2, 4, 4, 3), np.uint8)
    assert Preprocessing().apply(rgb, InputSpec(4, 4, 3)).shape == (2, 4, 4, 3)


@pytest.mark.parametrize(("bad", "message"), [
    ({"height": 0, "width": 28, "channels": 1}, "input height"),
    ({"height": 28, "width": 28, "channels": 2}, "input channels"),
    ({"height": 28, "width": 28, "channels": 1, "dtype": "int4"}, "input dtype"),
    ("28x28", "must be an object"),
])
def test_bad_input_specs_are_refused(bad: object, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        InputSpec.from_json(bad)


def _spec() -> RunSpec:
    return RunSpec(dataset="mnist", model="mlp", batch_size=8, lr=1e-3, lr_decay_rate=1.0, lr_decay_steps=10,
                   l2=0.0, ema_decay=0.9, seed=0, class_names=datasets.get_info("mnist").class_names)


def test_run_json_records_the_input_spec_and_preprocessing(tmp_path: Path) -> None:
    write_run(open_storage(tmp_path), _spec())
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["input_spec"] == {"height": 28, "width": 28, "channels": 1, "dtype": "uint8"}
    assert data["preprocessing"] == {"scale": 1 / 255, "mean": 0.0, "std": 1.0}
    spec = read_run(open_storage(tmp_path))
    assert spec is not None and spec.input == datasets.MNIST_INPUT and spec.prep == datasets.MNIST_PREPROCESSING


def test_run_json_without_them_gets_the_datasets_own(tmp_path: Path) -> None:
    data = _spec().to_json()
    del data["input_spec"], data["preprocessing"]
    (tmp_path / "run.json").write_text(json.dumps(data))
    spec = read_run(open_storage(tmp_path))
    assert spec is not None and spec.input == datasets.MNIST_INPUT and not spec.differences(_spec())


def test_an_edited_input_spec_is_a_difference_and_a_bad_one_an_error(tmp_path: Path) -> None:
    data = _spec().to_json() | {"input_spec": {"height": 32, "width": 32, "channels": 1, "dtype": "uint8"}}
    (tmp_path / "run.json").write_text(json.dumps(data))
    spec = read_run(open_storage(tmp_path))
    assert spec is not None and any(d.startswith("input_spec:") for d in spec.differences(_spec()))
    (tmp_path / "run.json").write_text(json.dumps(data | {"preprocessing": {"scale": 0}}))
    with pytest.raises(UsageError, match="bad run file: preprocessing scale"):
        read_run(open_storage(tmp_path))
