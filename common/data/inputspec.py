"""What a dataset's images are and how they become a model's inputs: one definition for every program.

A dataset states its `InputSpec` (height, width, channels, pixel dtype) and its `Preprocessing`
(scale, mean, std); `run.json` records both, and the trainer, the evaluator, reports, export and
predict all turn stored pixels into model inputs through `Preprocessing.apply`. Nothing else
knows an image size or a pixel scale.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from common.errors import UsageError

PIXEL_DTYPES = ("uint8", "float32")  # how a dataset stores its pixels


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The images a dataset holds and its model takes: `[H, W]` when one channel, `[H, W, C]` otherwise."""

    height: int  # pixels
    width: int  # pixels
    channels: int  # 1 (grey) or 3 (RGB)
    dtype: str = "uint8"  # how the pixels are stored (PIXEL_DTYPES)

    def __post_init__(self) -> None:
        for name in ("height", "width", "channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UsageError(f"input {name} ({value!r}) must be a positive integer")
        if self.channels not in (1, 3):
            raise UsageError(f"input channels ({self.channels}) must be 1 or 3")
        if self.dtype not in PIXEL_DTYPES:
            raise UsageError(f"input dtype ({self.dtype!r}) must be one of {', '.join(PIXEL_DTYPES)}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """`(height, width, channels)`: the shape a model is built for."""
        return self.height, self.width, self.channels

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of one stored image: `(H, W)` for one channel (as MNIST's files hold it), else `(H, W, C)`."""
        return (self.height, self.width) if self.channels == 1 else self.shape

    def describe(self) -> str:
        return f"{self.height}x{self.width}x{self.channels} {self.dtype}"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> InputSpec:
        """Parse run.json's `input` object.

        Raises:
          UsageError: not an object with integer height, width and channels and a known dtype.
        """
        if not isinstance(data, dict):
            raise UsageError(f"input ({data!r}) must be an object with height, width, channels and dtype")
        try:
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        except TypeError as e:
            raise UsageError(f"input ({data!r}) must have height, width and channels") from e


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How stored pixels become a model's float inputs: `(pixels * scale - mean) / std`."""

    scale: float = 1.0  # e.g. 1/255 for uint8 pixels in [0, 1]
    mean: float = 0.0  # subtracted after scaling
    std: float = 1.0  # divided by after subtracting the mean

    def __post_init__(self) -> None:
        for name in ("scale", "mean", "std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise UsageError(f"preprocessing {name} ({value!r}) must be a finite number")
        if self.scale == 0 or self.std <= 0:
            raise UsageError(f"preprocessing scale ({self.scale}) must be non-zero and std ({self.std}) positive")

    def apply(self, images: Any, spec: InputSpec) -> Any:
        """Turn stored images (`[N, *spec.stored_shape]`, any dtype) into float32 model inputs `[N, H, W, C]`."""
        import tensorflow as tf  # imported here so that reading a spec never starts TensorFlow

        x = tf.cast(images, tf.float32)
        if spec.channels == 1 and x.shape.rank == 3:
            x = x[..., tf.newaxis]
        # Divided by the reciprocal: for 1/255 that is exactly `/ 255`, which gives other float32
        # results than `* (1/255)` for 126 of the 256 pixel values.
        x = x / (1.0 / self.scale)
        if self.mean:
            x = x - self.mean
        if self.std != 1.0:
            x = x / self.std
        return x

    def apply_numpy(self, images: Any) -> Any:
        """`apply` on a NumPy array, for graphs fed through a session: float32, in the stored shape."""
        import numpy as np

        x = np.asarray(images, dtype=np.float32) / np.float32(1.0 / self.scale)
        return (x - np.float32(self.mean)) / np.float32(self.std)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Preprocessing:
        """Parse run.json's `preprocessing` object.

        Raises:
          UsageError: not an object of finite numbers.
        """
        if not isinstance(data, dict):
            raise UsageError(f"preprocessing ({data!r}) must be an object with scale, mean and std")
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
