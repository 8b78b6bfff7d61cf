"""B9's arithmetic: training FLOPs per image of a model from `common.model.models`, and a measured matmul peak.

Counted from the model's own layers: a 'SAME', stride-1 convolution does one k*k*c_in dot product per
output pixel and output channel; a dense layer one n_in dot product per output. A multiply-add is 2 FLOPs.
The backward pass costs about twice the forward (the gradients with respect to the inputs and to the
weights are each one product of the forward's size), so training is about 3x the forward. Biases, ReLU,
pooling, the loss, Adam and the EMA are left out: they are a few per cent of the convolutions.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import tensorflow as tf

from common.model.models import Classifier

BACKWARD_FACTOR = 2  # backward pass FLOPs per forward FLOP


def forward_macs(model: Classifier) -> dict[str, int]:
    """Multiply-adds per image of each layer of `model`, found by passing one image through it."""
    x = tf.zeros([1, *model.input_shape])
    macs: dict[str, int] = {}
    for name in model.layer_names:
        layer = model.layer(name)
        if name == model.flatten_before:
            x = tf.reshape(x, [1, -1])
        kernel = [int(d) for d in layer.kernel.shape]
        if len(kernel) == 4:  # [k, k, c_in, c_out]; 'SAME' and stride 1 keep the input's height and width
            macs[name] = int(x.shape[1]) * int(x.shape[2]) * kernel[0] * kernel[1] * kernel[2] * kernel[3]
        else:  # [n_in, n_out]
            macs[name] = kernel[0] * kernel[1]
        x = layer(x)
    return macs


def training_flops(model: Classifier) -> dict[str, Any]:
    """Training FLOPs per image, with the per-layer count and the formula spelled out."""
    macs = forward_macs(model)
    forward = 2 * sum(macs.values())
    total = (1 + BACKWARD_FACTOR) * forward
    terms = " + ".join(f"{name} {n:,}" for name, n in macs.items())
    return {"per_image": total, "forward_per_image": forward, "macs_by_layer": macs,
            "formula": f"(1 + {BACKWARD_FACTOR}) x 2 x ({terms}) multiply-adds = {total:,} FLOPs per image"}


def matmul_gflops(size: int, repeats: int) -> list[float]:
    """GFLOP/s of a warm float32 `tf.linalg.matmul` of two size x size matrices, `repeats` samples."""
    a = tf.random.stateless_uniform([size, size], seed=(1, 2))
    b = tf.random.stateless_uniform([size, size], seed=(3, 4))

    @tf.function
    def product() -> tf.Tensor:
        return tf.reduce_sum(tf.linalg.matmul(a, b))  # a scalar back, so the copy out costs nothing

    for _ in range(2):  # trace, and let the kernel pick its blocking
        product().numpy()
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        product().numpy()
        samples.append(2 * size**3 / (time.perf_counter() - began) / 1e9)
    return samples


def fraction_of_peak(flops_per_image: int, images_per_sec: float, peak_samples: list[float]) -> dict[str, float]:
    """Achieved training GFLOP/s against the matmul peak: the fastest warm run (other load only slows runs down).

    The achieved rate counts the direct convolution's FLOPs, so a kernel that needs fewer (Winograd, FFT)
    could in principle exceed the matmul's.
    """
    achieved = flops_per_image * images_per_sec / 1e9
    peak = max(peak_samples)
    return {"achieved_gflops": achieved, "peak_gflops": peak, "peak_median_gflops": statistics.median(peak_samples),
            "fraction": achieved / peak}
