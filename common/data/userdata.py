"""A user's own data: `folder:PATH`, `npz:PATH` or `module.path:function` in place of a dataset name.

- `folder:PATH` holds one subfolder of images per class (Keras' `image_dataset_from_directory`
  layout), or `train/`, `validation/` and `test/` folders of that layout. Images of any size and
  mode become `--image-size` and `--channels`; class names are the sorted subfolder names.
- `npz:PATH` holds `keras.datasets`' arrays: `x_train`, `y_train`, `x_test`, `y_test`.
- `module.path:function` returns the splits as arrays or `tf.data` datasets, with the class names.

Every source gives a `common.data.datasets.Dataset` of in-memory arrays, with its `DatasetInfo` (class
names, `InputSpec`, `Preprocessing`); docs/datasets.md describes the splits and the limits.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from common.data.datasets import VALIDATION_FRACTION, Dataset, DatasetInfo, Split, take
from common.data.inputspec import InputSpec, Preprocessing
from common.errors import DataFormatError, DataNotFoundError, UsageError
from common.reference import import_function
from common.reference import is_reference as is_function_reference

FOLDER, NPZ = "folder:", "npz:"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")  # those Keras' image_dataset_from_directory takes
SPLIT_FOLDERS = ("train", "validation", "test")
DEFAULT_IMAGE_SIZE = (256, 256)  # Keras' image_dataset_from_directory default
DEFAULT_CHANNELS = 3  # Keras' default color_mode "rgb"
SPLIT_SEED = 1337  # fixes which images a folder without validation/ or test/ holds out
# A folder is decoded into memory up to this many bytes of pixels; a larger one stays in its files
# and is decoded batch by batch (FileImages).
MAX_DECODED_BYTES = 4 * 2**30
UINT8_PREPROCESSING = Preprocessing(scale=1 / 255)
FLOAT_PREPROCESSING = Preprocessing()


def is_reference(name: str) -> bool:
    """Whether `name` names a user's data (`folder:`, `npz:` or `module:function`), not a built-in dataset."""
    return name.startswith((FOLDER, NPZ)) or is_function_reference(name)


def absolute(name: str) -> str:
    """`folder:` and `npz:` references with an absolute path, so that run.json works from any directory."""
    for prefix in (FOLDER, NPZ):
        if name.startswith(prefix):
            return prefix + str(Path(name[len(prefix):]).expanduser().resolve())
    return name


def short_name(name: str) -> str:
    """A name for a default workdir: `flowers` for `folder:/data/flowers`, `make_data` for `pkg.mod:make_data`."""
    for prefix in (FOLDER, NPZ):
        if name.startswith(prefix):
            return Path(name[len(prefix):]).stem or "data"
    return name.rpartition(":")[2]


def parse_image_size(text: str) -> tuple[int, int]:
    """`--image-size 32x32` -> (32, 32)."""
    height, sep, width = text.lower().partition("x")
    if not sep or not height.isdigit() or not width.isdigit() or int(height) < 1 or int(width) < 1:
        raise UsageError(f"--image-size ({text!r}) must be HEIGHTxWIDTH in pixels, e.g. 32x32")
    return int(height), int(width)


def describe(name: str, *, image_size: tuple[int, int] | None = None, channels: int | None = None) -> DatasetInfo:
    """The class names, input spec and preprocessing of a user's data (only a folder is read without decoding).

    Raises:
      UsageError: `--image-size` or `--channels` given for data that are not a folder; bad values.
      DataNotFoundError, DataFormatError: as `load`.
    """
    if name.startswith(FOLDER):
        folders = _split_folders(Path(name[len(FOLDER):]))
        height, width = image_size or DEFAULT_IMAGE_SIZE
        spec = InputSpec(height=height, width=width, channels=channels or DEFAULT_CHANNELS, dtype="uint8")
        return _info(name, _class_names(folders["train"]), spec, UINT8_PREPROCESSING)
    if image_size is not None or channels is not None:
        raise UsageError(f"--image-size and --channels go with folder: datasets; {name} keeps its arrays' shape")
    return _load_arrays(name).info


def load(name: str, spec: InputSpec) -> tuple[Dataset, list[str]]:
    """Load a user's data as `spec` says (folder images are decoded to its size); return it and any warnings.

    Raises:
      DataNotFoundError: the folder or file is not there.
      DataFormatError: fewer than two classes, no readable image, an npz without its arrays, arrays
        that do not fit together, a dataset function that raises or returns something else.
    """
    if name.startswith(FOLDER):
        return _load_folder(name, spec)
    return _load_arrays(name), []


def load_eval_split(name: str, spec: InputSpec) -> tuple[Split, tuple[str, ...] | None, InputSpec, list[str]]:
    """One evaluation set from a reference (the evaluator's --eval-data), images decoded as `spec` says.

    A `folder:` reference gives its `test/` folder when it has one, else every image of its class
    folders (one class is enough: a set may hold fewer classes than a run); an `npz:` file or a
    function gives its test split only. Returns the split, its class names (None for arrays that
    name none), the images' spec and warnings about skipped files.

    Raises:
      DataNotFoundError, DataFormatError: as `load`, and a folder with split folders but no `test/`.
    """
    if not name.startswith(FOLDER):
        parts, class_names = _npz_parts(Path(name[len(NPZ):])) if name.startswith(NPZ) else _function_parts(name)[:2]
        images, labels = _as_arrays(parts["test"], f"{name} (test)")
        images_spec, images = _input_spec(images, f"{name} (test)")
        labels = _checked_labels(labels, len(images), f"{name} (test)")
        names = None if class_names is None else tuple(class_names)
        if names is not None and labels.max(initial=0) >= len(names):
            raise DataFormatError(f"{name}: labels go up to {labels.max()} but there are {len(names)} class names")
        return Split(images, labels), names, images_spec, []
    root = Path(name[len(FOLDER):])
    if not root.is_dir():
        raise DataNotFoundError(f"{name}: no such folder")
    folder = root / "test" if (root / "test").is_dir() else root
    if folder == root and any((root / s).is_dir() for s in SPLIT_FOLDERS):
        raise DataFormatError(f"{name}: has split folders but no test/; name a folder of class subfolders")
    found = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in SPLIT_FOLDERS))
    if not found:
        raise DataFormatError(f"{name}: no class folder in {folder} (one subfolder of images per class)")
    warnings: list[str] = []
    split = _decode_split(folder, found, spec, warnings)
    if len(split) == 0:
        raise DataFormatError(f"{name}: no readable image in {folder}")
    return split, found, spec, warnings


def _info(name: str, class_names: tuple[str, ...], spec: InputSpec, prep: Preprocessing) -> DatasetInfo:
    return DatasetInfo(name=name, class_names=class_names, system_dirs=(), keras_cache_dir=None, keras_npz=None,
                       input_spec=spec, preprocessing=prep)


# Folders of images.

def _split_folders(root: Path) -> dict[str, Path]:
    """The folder of each split present: `train/` (else the root itself), `validation/`, `test/`."""
    if not root.is_dir():
        raise DataNotFoundError(f"dataset folder:{root}: no such folder")
    train = root / "train" if (root / "train").is_dir() else root
    return {"train": train} | {s: root / s for s in SPLIT_FOLDERS[1:] if (root / s).is_dir()}


def _class_names(folder: Path) -> tuple[str, ...]:
    """The sorted subfolder names of `folder` (a root's validation/ and test/ are splits, not classes)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in SPLIT_FOLDERS)
    if len(names) < 2:
        raise DataFormatError(f"dataset folder:{folder}: found {len(names)} class folder(s) "
                              f"({', '.join(names) or 'none'}); a classifier needs one subfolder per class, "
                              "at least two")
    return tuple(names)


def _image_files(folder: Path, class_names: tuple[str, ...]) -> tuple[list[Path], np.ndarray]:
    """Every image file under each class folder (recursively, sorted), and its class index."""
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(class_names):
        found = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        files += found
        labels += [index] * len(found)
    return files, np.asarray(labels, dtype=np.int64)


def read_image(path: Path, spec: InputSpec) -> np.ndarray:
    """One image file as `spec.stored_shape` uint8: converted to grey or RGB, resized bilinearly (as Keras does).

    Raises:
      OSError, ValueError, SyntaxError: PIL cannot read it (the callers name the file and go on).
    """
    from PIL import Image

    with Image.open(path) as opened:
        image = opened.convert("L" if spec.channels == 1 else "RGB")
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).reshape(spec.stored_shape)


class FileImages:
    """The images of a folder too large for memory, left in their files and decoded when indexed.

    `images[i]`, `images[a:b]` and `images[index_array]` give decoded uint8 arrays, as an in-memory
    split's images would; `select` picks files without decoding them.
    """

    def __init__(self, files: np.ndarray, spec: InputSpec) -> None:
        self.files = files  # object array of paths (str)
        self.spec = spec
        self.dtype = np.dtype(np.uint8)
        self.shape = (len(files), *spec.stored_shape)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: Any) -> np.ndarray:
        picked = self.files[key]
        if isinstance(picked, str):
            return self._decode(picked)
        return np.stack([self._decode(p) for p in picked]) if len(picked) else np.zeros((0, *self.shape[1:]), np.uint8)

    def select(self, index: Any) -> FileImages:
        """The images at `index` (a slice, indices or a mask), still in their files."""
        return FileImages(self.files[index], self.spec)

    def file_digest(self) -> bytes:
        """A digest of every file's name, size and modification time (reading them all would take too long)."""
        digest = hashlib.sha256(self.spec.describe().encode())
        for name in self.files:
            st = os.stat(name)
            digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return digest.digest()

    def _decode(self, path: str) -> np.ndarray:
        try:
            return read_image(Path(path), self.spec)
        except (OSError, ValueError, SyntaxError) as e:  # a file damaged after the listing: black, and said once
            if path not in _REPORTED:
                _REPORTED.add(path)
                print(f"warning: {path}: not a readable image ({type(e).__name__}); used as a black image",
                      file=sys.stderr, flush=True)
            return np.zeros(self.spec.stored_shape, np.uint8)


_REPORTED: set[str] = set()  # files FileImages found unreadable, each reported once per process


def _stream_split(files: list[Path], labels: np.ndarray, spec: InputSpec, warnings: list[str]) -> Split:
    """A split left in its files; a file whose header PIL cannot read is named in `warnings` and skipped."""
    from PIL import Image

    keep = np.ones(len(files), dtype=bool)
    for i, path in enumerate(files):
        try:
            with Image.open(path):  # reads the header only
                pass
        except (OSError, ValueError, SyntaxError) as e:
            keep[i] = False
            warnings.append(f"skipping {path}: not a readable image ({type(e).__name__}: {str(e)[:100]})")
    names = np.array([str(p) for p in files], dtype=object)[keep]
    return Split(FileImages(names, spec), labels[keep])  # type: ignore[arg-type]  # array-like, decoded per batch


def _decode_split(folder: Path, class_names: tuple[str, ...], spec: InputSpec,
                  warnings: list[str]) -> Split:
    """Decode a split's images (or leave them in their files when too large); unreadable files are skipped."""
    files, labels = _image_files(folder, class_names)
    if len(files) * math.prod(spec.stored_shape) > MAX_DECODED_BYTES:
        return _stream_split(files, labels, spec, warnings)
    images = np.zeros((len(files), *spec.stored_shape), dtype=np.uint8)
    keep = np.ones(len(files), dtype=bool)
    for i, path in enumerate(files):
        try:
            images[i] = read_image(path, spec)
        except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for a damaged or foreign file
            keep[i] = False
            warnings.append(f"skipping {path}: not a readable image ({type(e).__name__}: {str(e)[:100]})")
    return Split(images[keep], labels[keep])


def _load_folder(name: str, spec: InputSpec) -> tuple[Dataset, list[str]]:
    folders = _split_folders(Path(name[len(FOLDER):]))
    class_names = _class_names(folders["train"])
    for split, folder in folders.items():
        unknown = sorted({p.name for p in folder.iterdir() if p.is_dir()} - set(class_names) - set(SPLIT_FOLDERS))
        if unknown:
            raise DataFormatError(f"dataset {name}: {split} has classes the training images lack: {', '.join(unknown)}")
    warnings: list[str] = []
    splits = {s: _decode_split(f, class_names, spec, warnings) for s, f in folders.items()}
    if len(splits["train"]) == 0:
        raise DataFormatError(f"dataset {name}: no readable image in {folders['train']}")
    rest = _hold_out(splits.pop("train"), [s for s in SPLIT_FOLDERS[1:] if s not in splits])
    info = _info(name, class_names, spec, UINT8_PREPROCESSING)
    return Dataset(info, source=str(Path(name[len(FOLDER):])), **rest, **splits), warnings


def _hold_out(train: Split, missing: list[str]) -> dict[str, Split]:
    """Hold out `VALIDATION_FRACTION` of the training images, chosen by `SPLIT_SEED`, for each missing split."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(train))
    n = round(len(train) * VALIDATION_FRACTION)
    if missing and (n < 1 or n * len(missing) >= len(train)):
        raise DataFormatError(f"{len(train)} training images are too few to hold out {' and '.join(missing)}")
    out = {}
    for i, split in enumerate(missing):
        pick = np.sort(order[i * n:(i + 1) * n])
        out[split] = take(train, pick)
    return out | {"train": take(train, np.sort(order[len(missing) * n:]))}


# Arrays: an npz file or a function.

@functools.lru_cache(maxsize=2)  # the trainer describes, then loads, the same data
def _load_arrays(name: str) -> Dataset:
    if name.startswith(NPZ):
        path = Path(name[len(NPZ):])
        parts, class_names = _npz_parts(path)
        return _from_arrays(name, parts, class_names, source=str(path))
    parts, class_names, prep = _function_parts(name)
    return _from_arrays(name, parts, class_names, source=name, prep=prep)


def _npz_parts(path: Path) -> tuple[dict[str, Any], list[str] | None]:
    if not path.is_file():
        raise DataNotFoundError(f"dataset npz:{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise DataFormatError(f"dataset npz:{path}: not a readable .npz file ({e})") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise DataFormatError(f"dataset npz:{path}: lacks {', '.join(missing)} "
                              f"(it holds {', '.join(arrays) or 'nothing'})")
    parts = {s: (arrays[f"x_{s}"], arrays[f"y_{s}"]) for s in ("train", "test")}
    if "x_val" in arrays and "y_val" in arrays:
        parts["validation"] = (arrays["x_val"], arrays["y_val"])
    names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else None
    return parts, names


def _function_parts(name: str) -> tuple[dict[str, Any], list[str] | None, Preprocessing | None]:
    """Call a dataset function: it returns the splits, and optionally the class names and the preprocessing.

    That is `{"train": ..., "test": ..., "validation"?: ..., "class_names"?: [...], "preprocessing"?:
    {"scale": ..., "mean": ..., "std": ...}}`.
    """
    function = import_function(name, "--dataset")
    try:
        returned = function()
    except Exception as e:  # the user's code may raise anything; it becomes one line, exit 2
        raise DataFormatError(f"--dataset {name}: the function raised {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(returned, dict) or "train" not in returned or "test" not in returned:
        raise DataFormatError(f"--dataset {name}: must return a dict with 'train' and 'test' splits "
                              f"(and optionally 'validation' and 'class_names'), not a {type(returned).__name__}")
    parts = {s: returned[s] for s in SPLIT_FOLDERS if s in returned}
    names = returned.get("class_names")
    prep = returned.get("preprocessing")
    return (parts, [str(n) for n in names] if names is not None else None,
            Preprocessing.from_json(prep) if prep is not None else None)


def _as_arrays(part: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A split given as `(images, labels)` arrays, or a `tf.data` dataset of such pairs (batched or not)."""
    if hasattr(part, "as_numpy_iterator"):
        pairs = list(part.as_numpy_iterator())
        if not pairs:
            raise DataFormatError(f"{what}: the tf.data dataset is empty")
        batched = np.ndim(pairs[0][1]) > 0
        join = np.concatenate if batched else np.stack
        return join([p[0] for p in pairs]), join([p[1] for p in pairs])
    if not (isinstance(part, (tuple, list)) and len(part) == 2):
        raise DataFormatError(f"{what}: expected (images, labels) arrays or a tf.data dataset of them")
    return np.asarray(part[0]), np.asarray(part[1])


def _checked_labels(labels: np.ndarray, images: int, what: str) -> np.ndarray:
    """`labels` as int64 `[images]`; DataFormatError unless there is one integer label >= 0 per image."""
    labels = labels.reshape(-1)
    if len(labels) != images or not np.issubdtype(labels.dtype, np.integer) or labels.min(initial=0) < 0:
        raise DataFormatError(f"{what}: {images} images need as many integer labels >= 0 "
                              f"(got {len(labels)} of {labels.dtype})")
    return labels.astype(np.int64)


def _input_spec(images: np.ndarray, what: str) -> tuple[InputSpec, np.ndarray]:
    """The spec that `images` ([N, H, W] or [N, H, W, 1|3], uint8 or float) have; [N, H, W, 1] becomes [N, H, W]."""
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise DataFormatError(f"{what}: images of shape {list(images.shape)}; expected [N, H, W] or [N, H, W, 1|3]")
    dtype = "uint8" if images.dtype == np.uint8 else "float32"
    if dtype == "float32" and not np.issubdtype(images.dtype, np.floating):
        raise DataFormatError(f"{what}: images of dtype {images.dtype}; expected uint8 or float")
    spec = InputSpec(height=int(images.shape[1]), width=int(images.shape[2]),
                     channels=1 if images.ndim == 3 else 3, dtype=dtype)
    return spec, images.astype(dtype, copy=False)


def _from_arrays(name: str, parts: dict[str, Any], class_names: list[str] | None, *, source: str,
                 prep: Preprocessing | None = None) -> Dataset:
    """A Dataset from `{split: (images, labels)}`; validation is held out of train when not given.

    Without `prep`, uint8 pixels are scaled to [0, 1] and float ones taken as they are.
    """
    splits: dict[str, Split] = {}
    spec = None
    for split, part in parts.items():
        images, labels = _as_arrays(part, f"{name} ({split})")
        split_spec, images = _input_spec(images, f"{name} ({split})")
        if spec is not None and split_spec != spec:
            raise DataFormatError(f"{name}: {split} images are {split_spec.describe()}, train's {spec.describe()}")
        spec = split_spec
        splits[split] = Split(images, _checked_labels(labels, len(images), f"{name} ({split})"))
    assert spec is not None  # parts always hold train and test
    largest = max(int(s.labels.max(initial=0)) for s in splits.values())
    names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(largest + 1))
    if len(names) < 2 or largest >= len(names):
        raise DataFormatError(f"{name}: labels go up to {largest} but there are {len(names)} class names "
                              "(at least two classes are needed)")
    if "validation" not in splits:
        splits |= _hold_out(splits.pop("train"), ["validation"])
    if prep is None:
        prep = UINT8_PREPROCESSING if spec.dtype == "uint8" else FLOAT_PREPROCESSING
    return Dataset(_info(name, names, spec, prep), source=source, **splits)
