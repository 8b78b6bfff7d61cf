"""Reading image files and turning a photo or scan of one object into an image like the run's dataset.

MNIST was made this way: the object, light on dark, scaled to fit 20x20 keeping its aspect, then
placed in 28x28 so that its centre of mass is at the centre. Fashion-MNIST's products were scaled
so that their longest edge is 28 and centred by their bounding box. Photos and scans are usually
dark on light, so they are inverted first (the tutorial's `1 - img`), decided from the border pixels.
The output has the run's image size (`common.data.inputspec.InputSpec`), 28x28 for the MNIST family.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.data import userdata
from common.data.inputspec import InputSpec

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
MAX_PIXELS = 40_000_000  # larger images are refused as decompression bombs
CONTENT_THRESHOLD = 0.2  # of full brightness, after inversion: what counts as the object
# How each dataset's images were made: the box the object is scaled into (as a share of the image's
# side: MNIST's digits fit 20 of its 28 pixels) and how it is centred.
STYLES = {"mnist": (20 / 28, "mass"), "fashion-mnist": (1.0, "box")}


class ImageError(Exception):
    """This file cannot be used as an image; the message says why."""


def read_gray(path: Path) -> np.ndarray:
    """The image as float32 [H, W] in [0, 1] (transparent areas become white).

    Raises:
      ImageError: missing, not an image, truncated, or too large.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, MAX_PIXELS
            try:
                with Image.open(path) as image:
                    image.load()
                    return _to_gray(image)
            finally:
                Image.MAX_IMAGE_PIXELS = previous
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except IsADirectoryError:
        raise ImageError("is a folder") from None
    except UnidentifiedImageError:
        raise ImageError("not an image (PNG, JPEG, BMP or GIF)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL's own text quotes its hard limit (twice ours); say the one the README documents.
        raise ImageError(f"image too large: over {MAX_PIXELS:,} pixels, "
                         "refused as a possible decompression bomb") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"damaged image ({e})") from None


def _to_gray(image: Image.Image) -> np.ndarray:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def preprocess(gray: np.ndarray, spec: InputSpec, dataset: str = "mnist") -> np.ndarray:
    """Turn a grayscale picture (float [H, W] in [0, 1]) into uint8 `spec.stored_shape` the way `dataset` was made."""
    share, centre = STYLES.get(dataset, STYLES["mnist"])
    fit = round(share * min(spec.height, spec.width))
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    light = gray if np.median(border) < 0.5 else 1.0 - gray  # dark-on-light pictures are inverted
    rows, cols = np.nonzero(light > CONTENT_THRESHOLD)
    if len(rows):
        light = light[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = light.shape
    scale = fit / max(h, w)
    new_size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray((light * 255).astype(np.uint8)).resize(new_size, Image.Resampling.LANCZOS),
                       dtype=np.float32)
    canvas = np.zeros((spec.height, spec.width), dtype=np.float32)
    top, left = (spec.height - small.shape[0]) // 2, (spec.width - small.shape[1]) // 2
    canvas[top:top + small.shape[0], left:left + small.shape[1]] = small
    image = _center_by_mass(canvas) if centre == "mass" else np.clip(canvas, 0, 255).astype(np.uint8)
    return _channels(image, spec)


def _center_by_mass(canvas: np.ndarray) -> np.ndarray:
    total = canvas.sum()
    if total <= 0:
        return canvas.astype(np.uint8)
    height, width = canvas.shape
    ys, xs = np.indices(canvas.shape)
    dy = round((height - 1) / 2 - float((ys * canvas).sum() / total))
    dx = round((width - 1) / 2 - float((xs * canvas).sum() / total))
    shifted = np.zeros_like(canvas)
    src = canvas[max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)]
    shifted[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    return np.clip(shifted, 0, 255).astype(np.uint8)


def plain_resize(gray: np.ndarray, spec: InputSpec) -> np.ndarray:
    """`--no-preprocess`: the picture resized to the run's size as it is (no inversion, no cropping)."""
    size = (spec.width, spec.height)
    image = Image.fromarray((gray * 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS)
    return _channels(np.asarray(image, dtype=np.uint8), spec)


def read_as_trained(path: Path, spec: InputSpec) -> np.ndarray:
    """A file of a user's folder dataset, decoded and resized exactly as the trainer read its images.

    Raises:
      ImageError: as `read_gray`.
    """
    read_gray(path)  # refuses what is not a usable image (missing, foreign, damaged, too large), with the reason
    return userdata.read_image(path, spec)


def _channels(image: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A grey `[H, W]` image in the stored shape of `spec` (grey repeated into each channel)."""
    return image if spec.channels == 1 else np.repeat(image[..., None], spec.channels, axis=-1)


def expand(paths: list[str]) -> list[Path]:
    """Files as given, with each folder replaced by the images it holds (recursively, sorted)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        else:
            found.append(path)
    return found
