"""The demonstration's own Keras model, given to the trainer as `--model bench.demo_model:small_cnn`."""

from __future__ import annotations

from typing import Any


def small_cnn(num_classes: int, input_shape: tuple[int, int, int]) -> Any:
    """Two conv-BN-ReLU-pool blocks and a dense layer: a Keras 3 functional model of the usual kind."""
    import keras

    inputs = keras.Input(input_shape)
    x = inputs
    for i, filters in enumerate((16, 32), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
        x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(128, activation="relu", name="fc1")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="small_cnn")
