"""MNIST-family datasets by name: where the files are found, how they are split, their class names.

Sources are tried in a fixed order (README: "Datasets"); the first complete one wins and is
reported, so a run never trains on data it did not announce.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from common.data.idx import read_idx
from common.data.inputspec import InputSpec, Preprocessing
from common.errors import DataFormatError, DataNotFoundError, UsageError

# Canonical download location used by Keras' own dataset loaders.
KERAS_ORIGIN = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
IDX_ROLES = ("train-images", "train-labels", "t10k-images", "t10k-labels")
# The MNIST family: 28x28 grey images stored as uint8, fed to models in [0, 1], in 10 classes.
MNIST_INPUT = InputSpec(height=28, width=28, channels=1, dtype="uint8")
MNIST_PREPROCESSING = Preprocessing(scale=1 / 255)
# The tutorials hold out the last 5,000 of the 60,000 training images for validation.
VALIDATION_FRACTION = 5_000 / 60_000


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What is known about one named dataset."""

    name: str
    class_names: tuple[str, ...]
    # Folders that OS packages install the IDX files into.
    system_dirs: tuple[str, ...]
    # Keras cache: a folder of IDX files (relative to the cache's datasets/), or one .npz file.
    keras_cache_dir: str | None
    keras_npz: str | None
    # sha256 of the .npz download, from Keras' own loader.
    keras_npz_sha256: str | None = None
    os_package: str | None = None
    input_spec: InputSpec = MNIST_INPUT  # the images' size, channels and dtype
    preprocessing: Preprocessing = MNIST_PREPROCESSING  # how pixels become model inputs

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        class_names=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        keras_cache_dir="fashion-mnist",
        keras_npz=None,
        os_package="dataset-fashion-mnist",
    ),
    "mnist": DatasetInfo(
        name="mnist",
        class_names=tuple(str(d) for d in range(10)),
        system_dirs=(),
        keras_cache_dir=None,
        keras_npz="mnist.npz",
        keras_npz_sha256="731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1",
    ),
}
DEFAULT_DATASET = "fashion-mnist"


@dataclasses.dataclass(frozen=True)
class Split:
    """Images as `[N, *InputSpec.stored_shape]` (uint8 [N, 28, 28] for MNIST) and labels as int64 [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A loaded dataset with its three splits and where it came from."""

    info: DatasetInfo
    train: Split
    validation: Split
    test: Split
    source: str

    def split(self, name: str) -> Split:
        """Return the split called `name` (train, validation or test)."""
        if name not in ("train", "validation", "test"):
            raise UsageError(f"unknown split {name!r} (choose train, validation or test)")
        return getattr(self, name)


def take(split: Split, index: Any) -> Split:
    """The images and labels at `index` (a slice, indices or a mask); images left in their files stay there."""
    select = getattr(split.images, "select", None)  # common.data.userdata.FileImages
    return Split(select(index) if select else split.images[index], split.labels[index])


def content(array: Any) -> Any:
    """What identifies an array's content for a fingerprint: its bytes, or for images left in their files
    (common.data.userdata.FileImages) a digest of the files' names, sizes and times."""
    file_digest = getattr(array, "file_digest", None)
    return file_digest() if file_digest else np.ascontiguousarray(array).data


def subset(data: Dataset, classes: tuple[int, ...], *, train_examples: int = 0) -> Dataset:
    """Keep the images of `classes` (relabelled 0..k-1 in that order); optionally the first N training images.

    An empty `classes` keeps every class.
    """
    def pick(split: Split, limit: int = 0) -> Split:
        if classes:
            keep = np.isin(split.labels, classes)
            lookup = np.full(data.info.num_classes, -1, dtype=np.int64)
            lookup[list(classes)] = np.arange(len(classes))
            kept = take(split, keep)
            split = Split(kept.images, lookup[kept.labels])
        return take(split, slice(0, limit)) if limit else split

    return Dataset(data.info, pick(data.train, train_examples), pick(data.validation), pick(data.test), data.source)


def fingerprint(data: Dataset) -> str:
    """A short digest of every image and label, to tell later whether the same data were loaded.

    It hashes the arrays rather than the files, so gzipped and raw copies of one dataset agree; on
    Fashion-MNIST's 55 MB it takes about 0.04 s.
    """
    digest = hashlib.sha256()
    for split in (data.train, data.validation, data.test):
        for array in (split.images, split.labels):
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(content(array))
    return digest.hexdigest()[:16]


def parse_classes(text: str, info: DatasetInfo) -> tuple[int, ...]:
    """`--classes 0,1,2` or `--classes Sandal,Shirt` -> class indices, in the order given."""
    found = []
    for token in (t.strip() for t in text.split(",")):
        if token.isdigit() and int(token) < info.num_classes:
            found.append(int(token))
        elif token in info.class_names:
            found.append(info.class_names.index(token))
        else:
            raise UsageError(f"--classes: {token!r} is neither 0-{info.num_classes - 1} nor a class of {info.name} "
                             f"({', '.join(info.class_names)})")
    if len(set(found)) != len(found) or len(found) < 2:
        raise UsageError(f"--classes ({text!r}) must name at least two different classes")
    return tuple(found)


def get_info(name: str) -> DatasetInfo:
    """Return the description of dataset `name`, or fail with the known names."""
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(sorted(DATASETS))
        raise UsageError(f"unknown dataset {name!r} (choose one of: {known})") from None


def keras_cache_root() -> Path:
    """The folder Keras caches datasets in (`$KERAS_HOME/datasets`, default ~/.keras/datasets)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets"


def _idx_kind(role: str) -> str:
    return "idx3" if role.endswith("images") else "idx1"


def find_idx_files(folder: Path) -> dict[str, Path] | None:
    """Find the four IDX files in `folder` under any usual spelling; None if any is missing."""
    found = {}
    for role in IDX_ROLES:
        kind = _idx_kind(role)
        names = [f"{role}-{kind}-ubyte", f"{role}.{kind}-ubyte"]
        hits = [folder / (n + gz) for n in names for gz in ("", ".gz") if (folder / (n + gz)).is_file()]
        if not hits:
            return None
        found[role] = hits[0]
    return found


def _split_train(images: np.ndarray, labels: np.ndarray) -> tuple[Split, Split]:
    n_val = round(len(labels) * VALIDATION_FRACTION)
    if n_val < 1 or n_val >= len(labels):
        raise DataFormatError(f"training set of {len(labels)} images is too small to hold out a validation split")
    cut = len(labels) - n_val
    return Split(images[:cut], labels[:cut]), Split(images[cut:], labels[cut:])


def _checked_split(info: DatasetInfo, images: np.ndarray, labels: np.ndarray, what: str) -> Split:
    spec = info.input_spec
    if images.shape[1:] != spec.stored_shape:
        expected = "x".join(str(n) for n in spec.stored_shape)
        raise DataFormatError(f"{what}: images of shape {images.shape[1:]}, expected {expected}")
    if len(images) != len(labels):
        raise DataFormatError(f"{what}: {len(images)} images but {len(labels)} labels")
    if labels.size and int(labels.max()) >= info.num_classes:
        raise DataFormatError(f"{what}: label {int(labels.max())} out of range 0-{info.num_classes - 1}")
    return Split(images, labels.astype(np.int64))


def _load_idx_folder(info: DatasetInfo, files: dict[str, Path], source: str) -> Dataset:
    arrays = {role: read_idx(path, ndim=3 if _idx_kind(role) == "idx3" else 1) for role, path in files.items()}
    train = _checked_split(info, arrays["train-images"], arrays["train-labels"], str(files["train-images"].parent))
    test = _checked_split(info, arrays["t10k-images"], arrays["t10k-labels"], str(files["t10k-images"].parent))
    train_part, validation = _split_train(train.images, train.labels)
    return Dataset(info, train_part, validation, test, source)


def _load_npz(info: DatasetInfo, path: Path) -> Dataset:
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, ValueError, KeyError) as e:
        raise DataFormatError(f"{path}: not a valid dataset .npz ({e})") from e
    train = _checked_split(info, arrays["x_train"].astype(np.uint8), arrays["y_train"], str(path))
    test = _checked_split(info, arrays["x_test"].astype(np.uint8), arrays["y_test"], str(path))
    train_part, validation = _split_train(train.images, train.labels)
    return Dataset(info, train_part, validation, test, f"{path}")


def candidate_sources(info: DatasetInfo, data_dir: str | None) -> list[Path]:
    """The places looked at, in order: --data-dir alone if given, else the usual folders."""
    if data_dir is not None:
        return [Path(data_dir)]
    places = [Path("data") / info.name, *map(Path, info.system_dirs)]
    if info.keras_cache_dir:
        places.append(keras_cache_root() / info.keras_cache_dir)
    if info.keras_npz:
        places.append(keras_cache_root() / info.keras_npz)
    return places


def _try_source(info: DatasetInfo, place: Path) -> Dataset | None:
    if place.suffix == ".npz":
        return _load_npz(info, place) if place.is_file() else None
    files = find_idx_files(place) if place.is_dir() else None
    return _load_idx_folder(info, files, str(place)) if files else None


def load(name: str, data_dir: str | None = None, *, download: bool = True) -> Dataset:
    """Load dataset `name` from the first source that has it.

    Args:
      name: a key of `DATASETS`.
      data_dir: a folder with the four IDX files; when given, nothing else is tried.
      download: whether to fall back to a download through Keras' `get_file`.

    Raises:
      UsageError: unknown name.
      DataFormatError: a source exists but its files are broken (never skipped silently).
      DataNotFoundError: no source worked; the message lists what was tried.
    """
    info = get_info(name)
    tried = candidate_sources(info, data_dir)
    for place in tried:
        dataset = _try_source(info, place)
        if dataset is not None:
            return dataset
    if data_dir is not None:
        raise DataNotFoundError(
            f"--data-dir {data_dir}: no complete set of IDX files "
            f"({', '.join(IDX_ROLES)}, raw or .gz) in that folder"
        )
    errors = []
    if download:
        try:
            place = fetch(info)
        except DataNotFoundError as e:
            errors.append(str(e))
        else:
            dataset = _try_source(info, place)
            if dataset is not None:
                return dataset
            errors.append(f"downloaded files not found in {place}")
    listed = "; ".join(str(p) for p in tried)
    raise DataNotFoundError(
        f"dataset {name!r} not found (looked in: {listed}"
        + (f"; download failed: {errors[0]}" if errors else "")
        + f"). Fix: run 'make data DATASET={name}', or pass --data-dir with the four IDX files"
    )


def fetch(info: DatasetInfo) -> Path:
    """Download the dataset into the Keras cache with Keras' `get_file`; return where it lies."""
    try:
        from keras.utils import get_file
    except ImportError as e:  # pragma: no cover - keras ships with tensorflow
        raise DataNotFoundError(f"keras is not installed ({e})") from e
    try:
        if info.keras_npz:
            return Path(
                get_file(info.keras_npz, origin=KERAS_ORIGIN + info.keras_npz, file_hash=info.keras_npz_sha256)
            )
        folder = keras_cache_root() / str(info.keras_cache_dir)
        for role in IDX_ROLES:
            fname = f"{role}-{_idx_kind(role)}-ubyte.gz"
            get_file(fname, origin=KERAS_ORIGIN + fname, cache_subdir=f"datasets/{info.keras_cache_dir}")
        return folder
    except Exception as e:  # get_file raises several kinds (URLError, HTTPError, OSError, ValueError)
        raise DataNotFoundError(f"{type(e).__name__}: {e}") from e


def install_os_package(info: DatasetInfo) -> bool:
    """Install the dataset's OS package where apt-get exists; return whether it was tried."""
    if not info.os_package or shutil.which("apt-get") is None:
        return False
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=False, env=env)
    done = subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", info.os_package], check=False, env=env)
    return done.returncode == 0
